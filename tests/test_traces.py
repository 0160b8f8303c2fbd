"""Trace shards: exact round trips, exact merges, refusal of every kind of bad shard."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_moe_prune import traces as trace_module
from vllm_moe_prune.stats import RoutingStats
from vllm_moe_prune.traces import (
    FULL_VARIANT,
    Samples,
    ShardMeta,
    TraceError,
    from_routed_experts,
    load_traces,
    read_shard,
    save_logical_count,
    shard_checksum,
    to_logical_count,
    trace_files,
    write_shard,
)

torch.set_num_threads(1)

LAYERS = (1, 2, 4)  # decoder indices of the MoE layers: dense layers 0 and 3 in between
E, K = 8, 2
FP = "sha256:" + "a" * 32
T0 = 1_700_000_000.25
SUFFIX = ".trace.safetensors"


def routed(tokens: int, seed: int, experts: list[int] | None = None) -> torch.Tensor:
    """Distinct top-k ids per token and layer, drawn from ``experts`` (all by default)."""
    pool = torch.tensor(experts if experts is not None else range(E))
    scores = torch.rand(tokens, len(LAYERS), len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[scores.argsort(dim=-1)[..., :K]]


def probs(tokens: int, seed: int) -> torch.Tensor:
    return torch.rand(tokens, len(LAYERS), K, generator=torch.Generator().manual_seed(seed + 1000)) / K


def stats_of(tokens: int, seed: int) -> RoutingStats:
    return from_routed_experts(routed(tokens, seed), E, LAYERS, probs(tokens, seed))


def meta(label: str = "python", fingerprint: str = FP, **kw) -> ShardMeta:
    return ShardMeta(fingerprint=fingerprint, start=T0, end=T0 + 60, label=label, **kw)


def assert_stats_equal(a: RoutingStats, b: RoutingStats) -> None:
    assert (a.moe_layers, a.top_k, a.tokens) == (b.moe_layers, b.top_k, b.tokens)
    for name, tensor in a.tensors().items():
        other = getattr(b, name)
        assert tensor.dtype == other.dtype and torch.equal(tensor, other), name


def rewrite(src: Path, dest: Path, meta_update=None, tensor_update=None) -> Path:
    """Copy a shard with changed content and a VALID checksum: a buggy or lying writer."""
    with safe_open(str(src), framework="pt") as f:
        raw = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    raw.update(meta_update or {})
    tensors.update(tensor_update or {})
    raw["checksum"] = shard_checksum(raw, tensors)
    save_file(tensors, str(dest), metadata=raw)
    return dest


# ---------------------------------------------------------------- round trip and merge


def test_round_trip_is_exact(tmp_path):
    stats = stats_of(40, seed=0)
    samples = Samples(routed(40, 0)[:10], probs(40, 0)[:10], torch.arange(10) * 7)
    path = write_shard(tmp_path, stats, meta(rank=3), samples, include_token_ids=True)
    assert path.parent == tmp_path and path.name.endswith(".trace.safetensors")
    shard = read_shard(path)
    assert_stats_equal(shard.stats, stats)
    assert shard.meta.fingerprint == FP and shard.meta.label == "python" and shard.meta.variant == FULL_VARIANT
    assert shard.meta.rank == 3 and shard.meta.kept is None
    assert shard.meta.start == pytest.approx(T0, abs=1e-6) and shard.meta.end == pytest.approx(T0 + 60, abs=1e-6)
    assert shard.samples.topk_ids.dtype == torch.int16
    assert torch.equal(shard.samples.topk_ids.long(), samples.topk_ids)
    assert torch.equal(shard.samples.topk_probs, samples.topk_probs)
    assert torch.equal(shard.samples.token_ids, samples.token_ids)


def test_token_ids_are_dropped_unless_asked_for(tmp_path):
    samples = Samples(routed(5, 0), None, torch.arange(5))
    shard = read_shard(write_shard(tmp_path, stats_of(5, 0), meta(), samples))
    assert shard.samples.token_ids is None and shard.samples.topk_probs is None and len(shard.samples) == 5


def test_pruned_variant_round_trip_in_original_ids(tmp_path):
    kept = {layer: [0, 2, 5, 7] for layer in LAYERS}
    stats = from_routed_experts(routed(30, 1, experts=kept[1]), E, LAYERS, probs(30, 1))
    stats.prob_sum[:, 1] += 0.5  # the original router still gives mass to pruned experts
    shard = read_shard(write_shard(tmp_path, stats, meta(variant="abc123def456", kept=kept)))
    assert shard.meta.kept == kept and shard.meta.variant == "abc123def456"
    assert_stats_equal(shard.stats, stats)


def test_merge_equals_sum_and_concatenated_routing(tmp_path):
    parts = [(routed(n, seed), probs(n, seed)) for n, seed in ((30, 1), (17, 2), (50, 3))]
    for i, (ids, p) in enumerate(parts):
        write_shard(tmp_path, from_routed_experts(ids, E, LAYERS, p), meta(label=["python", "prose", "python"][i]))
    traces = load_traces(tmp_path, fingerprint=FP)
    whole = from_routed_experts(torch.cat([ids for ids, _ in parts]), E, LAYERS, torch.cat([p for _, p in parts]))
    assert torch.equal(traces.stats.counts, whole.counts) and torch.equal(traces.stats.transitions, whole.transitions)
    assert torch.allclose(traces.stats.prob_sum, whole.prob_sum)
    assert traces.tokens == 97 and traces.labels == {"prose": 17, "python": 80} and traces.variants == {"full": 97}
    assert len(traces.shards) == 3 and not traces.skipped
    only_prose = load_traces(tmp_path, label="prose")
    assert_stats_equal(only_prose.stats, from_routed_experts(parts[1][0], E, LAYERS, parts[1][1]))
    assert traces.provenance()["tokens"] == 97 and traces.provenance()["shards"] == 3


def test_trace_id_depends_on_content_not_order(tmp_path):
    for seed in range(3):
        write_shard(tmp_path, stats_of(10, seed), meta())
    files = trace_files(tmp_path)
    assert load_traces(files).trace_id == load_traces(files[::-1]).trace_id != load_traces(files[:2]).trace_id


def test_unknown_label_lists_the_labels_present(tmp_path):
    write_shard(tmp_path, stats_of(10, 0), meta(label="python"))
    with pytest.raises(TraceError, match=r"no trace shard with label 'c'.*'python'"):
        load_traces(tmp_path, label="c")


def test_missing_path_and_empty_dir_are_refused(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_traces(tmp_path / "nope")
    with pytest.raises(TraceError, match="no trace shards"):
        load_traces(tmp_path)


# ---------------------------------------------------------------- refusals


def _truncated(good: Path, dest: Path) -> Path:
    dest.write_bytes(good.read_bytes()[:-9])
    return dest


def _flipped_data(good: Path, dest: Path) -> Path:
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x10
    dest.write_bytes(bytes(data))
    return dest


def _flipped_label(good: Path, dest: Path) -> Path:
    data = good.read_bytes()
    assert data.count(b'"label":"python"') == 1
    dest.write_bytes(data.replace(b'"label":"python"', b'"label":"pythom"'))
    return dest


def _counts_edit(fn):
    def make(good: Path, dest: Path) -> Path:
        counts = read_shard(good).stats.counts.clone()
        fn(counts)
        return rewrite(good, dest, tensor_update={"counts": counts})

    return make


def _prob_nan(good: Path, dest: Path) -> Path:
    prob_sum = read_shard(good).stats.prob_sum.clone()
    prob_sum[0, 0] = float("nan")
    return rewrite(good, dest, tensor_update={"prob_sum": prob_sum})


def _moved_count(counts: torch.Tensor) -> None:
    """Totals still add up; only the per-expert agreement with transitions breaks."""
    source = int(counts[1].nonzero()[0])
    counts[1, source] -= 1
    counts[1, (source + 1) % E] += 1


BAD_SHARDS = {
    "truncated": (_truncated, "not a readable safetensors file"),
    "flipped data byte": (_flipped_data, "checksum mismatch"),
    "flipped metadata byte": (_flipped_label, "checksum mismatch"),
    "wrong version": (lambda g, d: rewrite(g, d, {"version": "2"}), "version '2' is not supported"),
    "not a trace": (lambda g, d: rewrite(g, d, {"format": "something/else"}), "not a vllm-moe-prune trace"),
    "lies about experts": (lambda g, d: rewrite(g, d, {"num_experts": "16"}), r"counts is int64 \[3, 8\].*\[3, 16\]"),
    "lies about layers": (lambda g, d: rewrite(g, d, {"moe_layers": "[1, 2]"}), r"tensor counts is int64 \[3, 8\]"),
    "lies about tokens": (lambda g, d: rewrite(g, d, {"tokens": "41"}), "expected tokens x top_k = 41 x 2"),
    "negative counts": (_counts_edit(lambda c: c.__setitem__((0, 0), -1)), "counts: contains negative values"),
    "NaN prob_sum": (_prob_nan, "prob_sum: contains NaN"),
    "inconsistent transitions": (_counts_edit(_moved_count), "disagree with the counts"),
    "counts outside kept": (
        lambda g, d: rewrite(g, d, {"variant": "p1", "kept": '{"1": [0, 1], "2": [0, 1], "4": [0, 1]}'}),
        "routing to experts that variant p1 does not keep",
    ),
}


@pytest.fixture
def good_dir(tmp_path) -> Path:
    directory = tmp_path / "traces"
    write_shard(directory, stats_of(40, seed=0), meta())
    return directory


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_refused_naming_the_file(good_dir, case):
    make, message = BAD_SHARDS[case]
    (good,) = trace_files(good_dir)
    bad = make(good, good_dir / f"bad{SUFFIX}")
    with pytest.raises(TraceError, match=message) as exc:
        read_shard(bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(TraceError, match="1 of 2 trace shards refused, nothing merged") as exc:
        load_traces(good_dir)
    assert str(bad) in str(exc.value) and str(good) not in str(exc.value)
    traces = load_traces(good_dir, skip_invalid=True)
    assert_stats_equal(traces.stats, read_shard(good).stats)
    assert [path for path, _ in traces.skipped] == [bad] and traces.provenance()["skipped"][0].startswith(str(bad))


def test_incomplete_metadata_is_refused(good_dir):
    (good,) = trace_files(good_dir)
    with safe_open(str(good), framework="pt") as f:
        raw = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    del raw["source_host"], raw["label"]
    raw["checksum"] = shard_checksum(raw, tensors)
    bad = good_dir / f"bad{SUFFIX}"
    save_file(tensors, str(bad), metadata=raw)
    with pytest.raises(TraceError, match=r"missing \['label', 'source_host'\]"):
        read_shard(bad)


def test_every_bad_shard_is_named(good_dir):
    (good,) = trace_files(good_dir)
    bad = [_truncated(good, good_dir / f"a{SUFFIX}"), _flipped_data(good, good_dir / f"b{SUFFIX}")]
    with pytest.raises(TraceError, match="2 of 3 trace shards refused") as exc:
        load_traces(good_dir)
    assert all(str(path) in str(exc.value) for path in bad)


def test_other_model_is_refused(good_dir):
    other = write_shard(good_dir, stats_of(12, seed=5), meta(fingerprint="sha256:" + "b" * 32))
    with pytest.raises(TraceError, match="nothing merged") as exc:
        load_traces(good_dir, fingerprint=FP)
    assert str(other) in str(exc.value) and "sha256:bbbb" in str(exc.value)
    with pytest.raises(TraceError, match="trace shards of 2 different models"):
        load_traces(good_dir)
    with pytest.raises(TraceError, match="2 different models"):
        load_traces(good_dir, skip_invalid=True)  # no telling which model was meant
    assert load_traces(good_dir, fingerprint=FP, skip_invalid=True).tokens == 40


def test_copied_shard_is_not_counted_twice(good_dir, tmp_path):
    (good,) = trace_files(good_dir)
    copy = tmp_path / f"copy{SUFFIX}"
    copy.write_bytes(good.read_bytes())
    with pytest.raises(TraceError, match="same content as"):
        load_traces([good_dir, copy])
    assert load_traces([good_dir, good_dir, good]).tokens == 40  # one file named twice is read once


def test_writer_refuses_what_readers_would_refuse(tmp_path):
    stats = stats_of(10, 0)
    stats.counts[0, 0] += 1
    with pytest.raises(TraceError, match="refusing to write"):
        write_shard(tmp_path / "t", stats, meta())
    kept = {layer: [0, 1] for layer in LAYERS}
    with pytest.raises(TraceError, match="does not keep"):
        write_shard(tmp_path / "t", stats_of(10, 0), meta(variant="p", kept=kept))
    with pytest.raises(TraceError, match="must not carry a kept map"):
        write_shard(tmp_path / "t", stats_of(10, 0), meta(kept=kept))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


# ---------------------------------------------------------------- concurrent writers


def _write_many(directory: Path, seeds: range) -> None:
    for seed in seeds:
        write_shard(directory, stats_of(5 + seed, seed), meta(label=f"l{seed % 3}"))


def test_concurrent_writers_lose_nothing(tmp_path):
    """Threads share a pid and a clock; forked processes share the directory.

    The processes are forked before the threads start: forking a process whose other
    threads hold locks can deadlock the child.
    """
    processes = [
        multiprocessing.get_context("fork").Process(target=_write_many, args=(tmp_path, range(30 + i * 3, 33 + i * 3)))
        for i in range(3)
    ]
    threads = [threading.Thread(target=_write_many, args=(tmp_path, range(i * 5, i * 5 + 5))) for i in range(6)]
    for worker in processes + threads:
        worker.start()
    for worker in threads + processes:
        worker.join()
    assert all(p.exitcode == 0 for p in processes)
    traces = load_traces(tmp_path)
    assert len(traces.shards) == 39 and not list(tmp_path.glob(".*"))
    expected = stats_of(5, 0)
    for seed in range(1, 39):
        expected = expected + stats_of(5 + seed, seed)
    assert_stats_equal(traces.stats, expected)


# ---------------------------------------------------------------- interop


def test_routed_experts_import_against_hand_computed_example():
    # 2 tokens, 2 MoE layers (decoder layers 3 and 5), 4 experts, top-2.
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [2, 0]]], dtype=np.int16)
    p = np.array([[[0.5, 0.25], [0.4, 0.1]], [[0.3, 0.3], [0.6, 0.2]]], dtype=np.float32)
    stats = from_routed_experts(ids, 4, (3, 5), p, renormalise=True)
    assert stats.tokens == 2 and stats.moe_layers == (3, 5) and stats.top_k == 2
    assert stats.counts.tolist() == [[1, 2, 1, 0], [1, 0, 2, 1]]
    # token 0 pairs (0,2) (0,3) (1,2) (1,3); token 1 pairs (1,2) (1,0) (2,2) (2,0)
    expected = torch.zeros(1, 4, 4, dtype=torch.int64)
    for a, b in [(0, 2), (0, 3), (1, 2), (1, 3), (1, 2), (1, 0), (2, 2), (2, 0)]:
        expected[0, a, b] += 1
    assert torch.equal(stats.transitions, expected)
    # layer 3: expert 0 <- .5, expert 1 <- .25 + .3, expert 2 <- .3; layer 5: 0 <- .2, 2 <- .4 + .6, 3 <- .1
    assert torch.allclose(stats.prob_sum, torch.tensor([[0.5, 0.55, 0.3, 0], [0.2, 0, 1.0, 0.1]], dtype=torch.float64))
    # renormalised gates: token 0 layer 3 -> 2/3, 1/3; token 1 -> 1/2, 1/2; layer 5 -> .8, .2 and .75, .25
    expected_gates = torch.tensor([[2 / 3, 1 / 3 + 0.5, 0.5, 0], [0.25, 0, 0.8 + 0.75, 0.2]], dtype=torch.float64)
    assert torch.allclose(stats.gate_sum, expected_gates)
    plain = from_routed_experts(torch.as_tensor(ids), 4, (3, 5))
    assert torch.equal(plain.counts, stats.counts) and not plain.prob_sum.any() and not plain.gate_sum.any()


def test_routed_experts_import_in_chunks_is_exact(monkeypatch):
    ids, p = routed(50, 7), probs(50, 7)
    whole = from_routed_experts(ids, E, LAYERS, p)
    monkeypatch.setattr(trace_module, "_PAIR_CHUNK", 8)
    assert_stats_equal(from_routed_experts(ids, E, LAYERS, p), whole)


def test_routed_experts_import_refuses_padding_and_layer_mismatch():
    ids = np.array([[[0, -1], [1, 2]]])
    with pytest.raises(TraceError, match="outside"):
        from_routed_experts(ids, 4, (0, 1))
    with pytest.raises(TraceError, match="2 layers, but 3 MoE layers"):
        from_routed_experts(np.abs(ids), 4, (0, 1, 2))
    with pytest.raises(TraceError, match="integer array"):
        from_routed_experts(ids.astype(np.float32), 4, (0, 1))


def test_logical_count_shapes_and_values(tmp_path):
    steps = [stats_of(n, seed) for seed, n in enumerate((10, 20, 30))]
    one = to_logical_count(steps[0])
    assert one.shape == (1, 3, E) and one.dtype == torch.int64 and torch.equal(one[0], steps[0].counts)
    many = to_logical_count(steps)
    assert many.shape == (3, 3, E) and torch.equal(many.sum(0), (steps[0] + steps[1] + steps[2]).counts)
    assert many[:, 0].sum(dim=1).tolist() == [10 * K, 20 * K, 30 * K]
    per_decoder = to_logical_count(steps, num_hidden_layers=6)
    assert per_decoder.shape == (3, 6, E)
    assert not per_decoder[:, [0, 3, 5]].any() and torch.equal(per_decoder[:, list(LAYERS)], many)
    with pytest.raises(TraceError, match="MoE layer 4 exists"):
        to_logical_count(steps, num_hidden_layers=4)
    path = save_logical_count(tmp_path / "dump.pt", steps, num_hidden_layers=6)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["logical_count"] and torch.equal(loaded["logical_count"], per_decoder)
