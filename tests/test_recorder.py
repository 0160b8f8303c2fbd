"""The routing recorder on its own: compiled as vLLM compiles a model, chunked, sampled.

The engine tests (tests/test_loader.py, tests/test_capture.py) compare capture with the
routing transformers performs; these isolate the recorder's two halves for every routing
rule (softmax top-k; DeepSeek-V2 grouped by best expert; DeepSeek-V3 sigmoid + score
bias, grouped by best two), on pruned layers and on a layer that lacks experts (a
non-uniform export): ``record``, fed by vLLM's own CPU router exactly as the plugin's
traced router feeds it and traced by torch.compile into one dynamic-shape graph, and
``count``, which counts all layers (whole, or in chunks of layers when a pass is large),
either at every step (where CUDA graphs replay the model) or for several steps at once
(on CPU). The statistics are checked against counts made here by plain loops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from reference import tiny_checkpoint
from routing_reference import count_layer, empty_stats
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.families import MoEShape
from vllm_moe_prune_plugins import capture
from vllm_moe_prune_plugins.capture import RoutingRecorder

#: Kept experts per MoE layer, whole groups for DeepSeek (V2: 4 groups of 2; V3: 2 of 4).
KEPT = {"qwen3_moe": [[0, 1, 2, 4, 5, 6, 7], [1, 3, 4, 7], [0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 3, 5, 6]],
        "deepseek_v2": [[0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 5, 6]],
        "deepseek_v3": [[0, 1, 2, 4, 5, 6], [1, 3, 4, 7]]}
#: Experts each layer's checkpoint holds: the last qwen3 layer is a non-uniform export's, with 7 of 8.
HELD = {"qwen3_moe": [8, 8, 8, 7], "deepseek_v2": [8, 8], "deepseek_v3": [8, 8]}
HIDDEN, TOKENS = 64, 40


@dataclass
class Layers:
    """Every layer's full router (original ids) and the routing vLLM's CPU router does over its kept experts."""

    shape: MoEShape
    routers: list[torch.Tensor]  # [held, H] per layer
    biases: list[torch.Tensor | None]  # DeepSeek-V3 score-correction bias [held]
    vllm_routers: list

    def route(self, slot: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept experts' logits and the router's ``(weights, ids)`` in the layer's own ids."""
        logits = hidden @ self.routers[slot][self.kept(slot)].t()
        weights, ids = self.vllm_routers[slot].select_experts(hidden, logits)
        return logits, weights, ids

    def kept(self, slot: int) -> list[int]:
        return KEPT[self.shape.family.model_type][slot]


def layers_for(family: str, tiny_root) -> Layers:
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    shape = Checkpoint.open(tiny_checkpoint(family, tiny_root)).shape
    shape = replace(shape, moe_layers=tuple(range(len(KEPT[family]))))
    generator = torch.Generator().manual_seed(0)
    routers, biases, vllm_routers = [], [], []
    for slot, kept in enumerate(KEPT[family]):
        routers.append(torch.randn(HELD[family][slot], HIDDEN, generator=generator))
        bias = torch.randn(HELD[family][slot], generator=generator) * 0.1 if shape.scoring == "sigmoid" else None
        biases.append(bias)
        vllm_routers.append(CPURouter(
            top_k=shape.top_k, global_num_experts=len(kept), renormalize=shape.renormalise,
            use_grouped_topk=shape.num_groups > 1, num_expert_group=shape.num_groups, topk_group=shape.topk_groups,
            scoring_func=shape.scoring, e_score_correction_bias=None if bias is None else bias[kept],
        ))
    return Layers(shape, routers, biases, vllm_routers)


def recorder_for(layers: Layers, sample_capacity: int = 0,
                 count_batch_tokens: int = capture.COUNT_BATCH_TOKENS) -> RoutingRecorder:
    """A recorder loaded as the model classes load it: held router rows and the kept ids."""
    family = layers.shape.family.model_type
    recorder = RoutingRecorder(layers.shape, HIDDEN, 256, [len(k) for k in KEPT[family]], HELD[family],
                               sample_capacity, count_batch_tokens)
    for slot, kept in enumerate(KEPT[family]):
        recorder.set_router(slot, layers.routers[slot], kept)
    recorder.set_active(True)
    return recorder


def hidden_states(seed: int = 1) -> torch.Tensor:
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(seed))


def record_all(recorder: RoutingRecorder, layers: Layers, hidden: torch.Tensor) -> None:
    """One forward pass of every MoE layer: route (vLLM's router), then record, as the traced router does."""
    for slot in range(len(layers.routers)):
        logits, weights, ids = layers.route(slot, hidden)
        recorder.record(slot, hidden, logits, weights, ids)


def step(recorder: RoutingRecorder, layers: Layers, hidden: torch.Tensor, record=record_all) -> None:
    record(recorder, layers, hidden)
    recorder.count(hidden.shape[0])


def expected_stats(layers: Layers, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counted token by token in original ids: the full softmax over every original expert
    (an expert the checkpoint lacks has probability 0), the routed ids and weights."""
    stats = empty_stats(len(layers.routers), layers.shape.num_experts)
    for hidden in batches:
        previous = None
        for slot, router in enumerate(layers.routers):
            _, weights, ids = layers.route(slot, hidden)
            chosen = torch.tensor(layers.kept(slot))[ids.long()]
            count_layer(stats, slot, (hidden @ router.t()).softmax(dim=-1), chosen, weights, previous)
            previous = chosen
        stats["tokens"] += hidden.shape[0]
    return stats


def assert_stats_equal(got, want: dict) -> None:
    assert got.tokens == int(want["tokens"])
    assert torch.equal(got.counts, want["counts"])
    assert torch.equal(got.transitions, want["transitions"])
    torch.testing.assert_close(got.prob_sum, want["prob_sum"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.gate_sum, want["gate_sum"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(KEPT))
def test_compiled_recording_counts_the_routing_in_original_ids(family, tiny_root):
    layers = layers_for(family, tiny_root)
    recorder = recorder_for(layers)
    record = torch.compile(record_all, dynamic=True)
    batches = [hidden_states(1), hidden_states(2)[:23]]  # two batch sizes through one dynamic-shape graph
    for hidden in batches:
        step(recorder, layers, hidden, record)
    got, _ = recorder.drain()
    want = expected_stats(layers, batches)
    assert_stats_equal(got, want)
    got.validate()
    assert got.counts.sum(dim=1).tolist() == [got.tokens * layers.shape.top_k] * len(KEPT[family])
    for slot, kept in enumerate(KEPT[family]):  # only kept experts are routed to
        pruned = sorted(set(range(layers.shape.num_experts)) - set(kept))
        assert int(got.counts[slot, pruned].sum()) == 0
    if family == "qwen3_moe":  # an expert the checkpoint lacks has no probability; dropped ones do
        assert float(got.prob_sum[3, 7]) == 0.0 and float(got.prob_sum[0, 3]) > 0.0


@pytest.mark.parametrize("family", list(KEPT))
def test_counting_in_chunks_of_layers_equals_one_pass(family, tiny_root, monkeypatch):
    layers = layers_for(family, tiny_root)
    whole = recorder_for(layers)
    step(whole, layers, hidden_states())
    want, _ = whole.drain()
    row_bytes = whole.pass_bytes_per_layer(TOKENS)
    for layers_per_chunk in (1, 2):  # chunk borders fall between every pair of layers
        monkeypatch.setattr(capture, "COUNT_PASS_BYTES", layers_per_chunk * row_bytes)
        chunked = recorder_for(layers)
        step(chunked, layers, hidden_states())
        got, _ = chunked.drain()
        assert torch.equal(got.counts, want.counts)
        assert torch.equal(got.transitions, want.transitions)
        # float32 products over other groupings of layers: equal up to rounding
        torch.testing.assert_close(got.gate_sum, want.gate_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.prob_sum, want.prob_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(KEPT))
def test_steps_counted_together_equal_steps_counted_one_by_one(family, tiny_root):
    """Steps of different sizes and hidden states: with 0 every step is counted at once;
    with 50, the first two steps (80 tokens) are counted together at the second, the
    third waits until the drain. Compiled, as vLLM runs ``record``, so the running offset
    the graph reads is checked too: rows written at a stale offset change the counts."""
    layers = layers_for(family, tiny_root)
    record = torch.compile(record_all, dynamic=True)
    batches = [hidden_states(1), hidden_states(2), hidden_states(3)[:23]]
    for count_batch_tokens in (0, 50):
        recorder = recorder_for(layers, count_batch_tokens=count_batch_tokens)
        for hidden in batches:
            step(recorder, layers, hidden, record)
        assert recorder._waiting == (0 if count_batch_tokens == 0 else 23)
        assert_stats_equal(recorder.drain()[0], expected_stats(layers, batches))
        assert recorder._waiting == 0 and int(recorder.offset) == 0


@pytest.mark.parametrize("in_graph_capture", [False, True], ids=["skipped", "weighted-by-flag"])
def test_recording_off_adds_nothing_and_drain_resets(in_graph_capture, tiny_root, monkeypatch):
    """Off, count returns at once, except while a CUDA graph is captured: then it runs and
    the on/off flag (a tensor the replayed graph reads) zeroes every token's weight.
    There is no GPU here, so graph capture is simulated: the recorder is made as on a
    CUDA device (every step counted at once) and the capture check is patched."""
    monkeypatch.setattr(capture, "capturing_cuda_graph", lambda: in_graph_capture)
    layers = layers_for("qwen3_moe", tiny_root)
    recorder = recorder_for(layers, count_batch_tokens=0)
    recorder._graphs = True
    recorder.set_active(False)
    step(recorder, layers, hidden_states())
    off, _ = recorder.drain()
    assert off.tokens == 0 and int(off.counts.sum()) == 0 and int(off.transitions.sum()) == 0
    assert float(off.prob_sum.sum()) == 0.0
    recorder._on = in_graph_capture  # a graph captured while on replays with the flag off
    step(recorder, layers, hidden_states())
    assert int(recorder.drain()[0].counts.sum()) == 0
    recorder.set_active(True)
    step(recorder, layers, hidden_states())
    assert recorder.drain()[0].tokens == TOKENS
    assert recorder.drain()[0].tokens == 0


@pytest.mark.parametrize("count_batch_tokens", [0, 50], ids=["every-step", "steps-together"])
def test_padding_rows_add_nothing(count_batch_tokens, tiny_root):
    """vLLM marks padding rows (CUDA-graph padding, warm-up) in one persistent mask that it
    rewrites before every step, and hands the model a slice of it from the start (the
    forward context's ``is_padding``). The recorder follows that buffer once and the
    compiled graph reads each step's mask from it: a step of 40 rows whose last 8 are
    padding counts as its first 32, the next step, unpadded, counts whole."""
    layers = layers_for("deepseek_v3", tiny_root)
    recorder = recorder_for(layers, count_batch_tokens=count_batch_tokens)
    runner_mask = torch.zeros(300, dtype=torch.bool)  # the model runner's persistent buffer
    recorder.follow_padding_mask(runner_mask[:TOKENS])
    record = torch.compile(record_all, dynamic=True)
    runner_mask[TOKENS - 8 : TOKENS] = True
    step(recorder, layers, hidden_states(1), record)
    runner_mask[:TOKENS] = False  # the next step's mask, written as vLLM writes it
    step(recorder, layers, hidden_states(2), record)
    want = expected_stats(layers, [hidden_states(1)[: TOKENS - 8], hidden_states(2)])
    assert_stats_equal(recorder.drain()[0], want)


@pytest.mark.parametrize("mask", [torch.zeros(100, dtype=torch.bool), torch.zeros(300)], ids=["short", "float"])
def test_a_padding_mask_the_graph_cannot_follow_is_refused(mask, tiny_root):
    """Shorter than the recorder's largest step (256 tokens here) or not bool: a clear error at start-up."""
    recorder = recorder_for(layers_for("qwen3_moe", tiny_root))
    with pytest.raises(RuntimeError, match="padding mask .* not a view of a persistent bool buffer of at least 256"):
        recorder.follow_padding_mask(mask[:TOKENS])


def test_sampling_at_rate_one_keeps_every_token_routing(tiny_root):
    layers = layers_for("qwen3_moe", tiny_root)
    recorder = recorder_for(layers, sample_capacity=64)
    recorder.set_sample_rate(1.0)
    step(recorder, layers, hidden_states())
    stats, samples = recorder.drain()
    ids, probs = torch.tensor(samples["topk_ids"]), torch.tensor(samples["topk_probs"])
    assert ids.shape == (TOKENS, len(KEPT["qwen3_moe"]), recorder.top_k) and samples["dropped"] == 0
    for slot in range(ids.shape[1]):  # token by token: the ids and full-softmax probabilities routed
        full = (hidden_states() @ layers.routers[slot].t()).softmax(dim=-1)
        _, _, local = layers.route(slot, hidden_states())
        chosen = torch.tensor(layers.kept(slot))[local.long()]
        assert torch.equal(ids[:, slot].long(), chosen)
        torch.testing.assert_close(probs[:, slot], full.gather(-1, chosen))
    counted = torch.zeros_like(stats.counts)
    counted.scatter_add_(1, ids.transpose(0, 1).flatten(1).long(), torch.ones_like(ids.transpose(0, 1).flatten(1).long()))
    assert torch.equal(counted, stats.counts)  # the samples are the routing that was counted
    step(recorder, layers, hidden_states())
    step(recorder, layers, hidden_states())  # 80 samples into a ring of 64: the 16 oldest are overwritten
    assert recorder.drain()[1]["dropped"] == 2 * TOKENS - 64


def test_routing_of_other_experts_than_the_layer_holds_is_refused(tiny_root):
    layers = layers_for("qwen3_moe", tiny_root)
    recorder = recorder_for(layers)
    with pytest.raises(ValueError, match="routes to 5 of 7 held experts"):
        recorder.set_kept(3, [0, 2, 3, 5, 7])  # the checkpoint of layer 3 lacks expert 7
