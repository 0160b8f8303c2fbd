"""The routing recorder on its own: compiled as vLLM compiles a model, chunked, sampled.

The engine tests (tests/test_loader.py, tests/test_capture.py) compare capture with the
routing transformers performs; these isolate the recorder's two halves for every routing
rule (softmax top-k; DeepSeek-V2 grouped by best expert; DeepSeek-V3 sigmoid + score
bias, grouped by best two), pruned, at two batch sizes: the per-layer ``record`` traced
by torch.compile into one dynamic-shape graph, and the per-step ``count`` that batches
all layers (whole, or in chunks of layers when a step is large), either at every step
(where CUDA graphs replay the model) or for several steps at once (on CPU).
"""

from __future__ import annotations

import pytest
import torch

from reference import tiny_checkpoint
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune_plugins import capture
from vllm_moe_prune_plugins.capture import RoutingRecorder

#: Kept experts per MoE layer, whole groups for DeepSeek (V2: 4 groups of 2; V3: 2 of 4).
KEPT = {"qwen3_moe": [[0, 1, 2, 4, 5, 6, 7], [1, 3, 4, 7], [0, 1, 2, 3, 4, 5, 6, 7]],
        "deepseek_v2": [[0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 5, 6]],
        "deepseek_v3": [[0, 1, 2, 4, 5, 6], [1, 3, 4, 7]]}
HIDDEN, TOKENS = 64, 40


def recorder_for(
    family: str, tiny_root, sample_capacity: int = 0, count_batch_tokens: int = capture.COUNT_BATCH_TOKENS
) -> tuple[RoutingRecorder, list[torch.Tensor]]:
    """A recorder with random routers loaded as the model classes load them, and hidden states."""
    ckpt = Checkpoint.open(tiny_checkpoint(family, tiny_root))
    shape = ckpt.shape
    shape = type(shape)(**{**shape.__dict__, "moe_layers": tuple(range(len(KEPT[family])))})
    generator = torch.Generator().manual_seed(0)
    recorder = RoutingRecorder(shape, HIDDEN, 256, sample_capacity, count_batch_tokens)
    for slot, kept in enumerate(KEPT[family]):
        recorder.set_router(slot, torch.randn(shape.num_experts, HIDDEN, generator=generator), kept)
        if recorder.score_bias is not None:
            recorder.set_score_bias(slot, torch.randn(shape.num_experts, generator=generator) * 0.1)
    recorder.set_active(True)
    return recorder, [torch.randn(TOKENS, HIDDEN, generator=generator) for _ in KEPT[family]]


def step(recorder: RoutingRecorder, hidden: list[torch.Tensor], record=None) -> None:
    """One forward pass: every layer records (through ``record`` if given), then one count."""
    (record or (lambda r, h: [r.record(x, slot) for slot, x in enumerate(h)]))(recorder, hidden)
    recorder.count(hidden[0].shape[0])


@pytest.mark.parametrize("family", list(KEPT))
def test_compiled_recording_equals_eager(family, tiny_root):
    eager, hidden = recorder_for(family, tiny_root)
    compiled, _ = recorder_for(family, tiny_root)
    record = torch.compile(lambda r, h: [r.record(x, slot) for slot, x in enumerate(h)], dynamic=True)
    for cut in (TOKENS, 23):  # two batch sizes through one dynamic-shape graph
        step(eager, [h[:cut] for h in hidden])
        step(compiled, [h[:cut] for h in hidden], record)
    want, _ = eager.drain()
    got, _ = compiled.drain()
    assert got.tokens == want.tokens == TOKENS + 23
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.transitions, want.transitions)
    torch.testing.assert_close(got.prob_sum, want.prob_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.gate_sum, want.gate_sum, rtol=1e-5, atol=1e-5)
    shape = eager.shape
    assert torch.equal(want.counts.sum(dim=1), torch.full((len(hidden),), want.tokens * shape.top_k))
    assert int(want.transitions.sum()) == (len(hidden) - 1) * want.tokens * shape.top_k**2
    torch.testing.assert_close(want.prob_sum.sum(dim=1), torch.full((len(hidden),), float(want.tokens),
                                                                    dtype=torch.float64))
    for slot, kept in enumerate(KEPT[family]):  # only kept experts are routed to
        pruned = sorted(set(range(shape.num_experts)) - set(kept))
        assert int(want.counts[slot, pruned].sum()) == 0


@pytest.mark.parametrize("family", list(KEPT))
def test_counting_in_chunks_of_layers_equals_one_pass(family, tiny_root, monkeypatch):
    whole, hidden = recorder_for(family, tiny_root)
    step(whole, hidden)
    want, _ = whole.drain()
    row_bytes = whole.pass_bytes_per_layer(TOKENS)
    for layers_per_chunk in (1, 2):  # chunk borders fall between every pair of layers
        monkeypatch.setattr(capture, "COUNT_PASS_BYTES", layers_per_chunk * row_bytes)
        chunked, _ = recorder_for(family, tiny_root)
        step(chunked, hidden)
        got, _ = chunked.drain()
        assert torch.equal(got.counts, want.counts)
        assert torch.equal(got.transitions, want.transitions)
        torch.testing.assert_close(got.gate_sum, want.gate_sum)
        torch.testing.assert_close(got.prob_sum, want.prob_sum)


@pytest.mark.parametrize("family", list(KEPT))
def test_steps_counted_together_equal_steps_counted_one_by_one(family, tiny_root):
    """Steps of different sizes and hidden states: with 0 every step is counted at once;
    with 50, the first two steps (80 tokens) are counted together at the second, the
    third waits until the drain. Compiled, as vLLM runs ``record``, so the running offset
    the graph reads is checked too: rows written at a stale offset change the counts."""
    record = torch.compile(lambda r, h: [r.record(x, slot) for slot, x in enumerate(h)], dynamic=True)
    results = []
    for count_batch_tokens in (0, 50):
        recorder, hidden = recorder_for(family, tiny_root, count_batch_tokens=count_batch_tokens)
        for cut, shift in ((TOKENS, 0), (TOKENS, 7), (23, 13)):
            step(recorder, [h.roll(shift, dims=0)[:cut] for h in hidden], record)
        assert recorder._waiting == (0 if count_batch_tokens == 0 else 23)
        results.append(recorder.drain()[0])
        assert recorder._waiting == 0 and int(recorder.offset) == 0
    each, together = results
    assert each.tokens == together.tokens == 2 * TOKENS + 23
    assert torch.equal(together.counts, each.counts)
    assert torch.equal(together.transitions, each.transitions)
    # float32 sums over other groupings of tokens: equal up to rounding
    torch.testing.assert_close(together.gate_sum, each.gate_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.prob_sum, each.prob_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_graph_capture", [False, True], ids=["skipped", "weighted-by-flag"])
def test_recording_off_adds_nothing_and_drain_resets(in_graph_capture, tiny_root, monkeypatch):
    """Off, count returns at once, except while a CUDA graph is captured: then it runs and
    the on/off flag (a tensor the replayed graph reads) zeroes every token's weight.
    There is no GPU here, so graph capture is simulated: the recorder is made as on a
    CUDA device (every step counted at once) and the capture check is patched."""
    monkeypatch.setattr(capture, "_capturing_cuda_graph", lambda: in_graph_capture)
    recorder, hidden = recorder_for("qwen3_moe", tiny_root, count_batch_tokens=0)
    recorder._graphs = True
    recorder.set_active(False)
    step(recorder, hidden)
    off, _ = recorder.drain()
    assert off.tokens == 0 and int(off.counts.sum()) == 0 and int(off.transitions.sum()) == 0
    assert float(off.prob_sum.sum()) == 0.0
    recorder._on = in_graph_capture  # a graph captured while on replays with the flag off
    step(recorder, hidden)
    assert int(recorder.drain()[0].counts.sum()) == 0
    recorder.set_active(True)
    step(recorder, hidden)
    assert recorder.drain()[0].tokens == TOKENS
    assert recorder.drain()[0].tokens == 0


def test_padding_rows_add_nothing(tiny_root):
    """vLLM marks padding rows (warm-up, CUDA-graph padding) in the forward context's
    ``is_padding``: a step of 40 rows whose last 8 are padding counts as its first 32."""
    from vllm.forward_context import ForwardContext, override_forward_context

    padded, hidden = recorder_for("deepseek_v3", tiny_root)
    is_padding = torch.arange(TOKENS) >= TOKENS - 8
    with override_forward_context(ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                                                 is_padding=is_padding)):
        step(padded, hidden)
    unpadded, _ = recorder_for("deepseek_v3", tiny_root)
    step(unpadded, [h[: TOKENS - 8] for h in hidden])
    got, want = padded.drain()[0], unpadded.drain()[0]
    assert got.tokens == want.tokens == TOKENS - 8
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.transitions, want.transitions)
    torch.testing.assert_close(got.prob_sum, want.prob_sum)
    torch.testing.assert_close(got.gate_sum, want.gate_sum)


def test_sampling_at_rate_one_keeps_every_token_routing(tiny_root):
    recorder, hidden = recorder_for("qwen3_moe", tiny_root, sample_capacity=64)
    recorder.set_sample_rate(1.0)
    step(recorder, hidden)
    stats, samples = recorder.drain()
    ids, probs = torch.tensor(samples["topk_ids"]), torch.tensor(samples["topk_probs"])
    assert ids.shape == (TOKENS, len(hidden), recorder.top_k) and samples["dropped"] == 0
    counted = torch.zeros_like(stats.counts)
    counted.scatter_add_(1, ids.transpose(0, 1).flatten(1).long(), torch.ones_like(ids.transpose(0, 1).flatten(1).long()))
    assert torch.equal(counted, stats.counts)  # the samples are the routing that was counted
    assert bool((probs > 0).all()) and bool((probs <= 1).all())
    step(recorder, hidden)
    step(recorder, hidden)  # 80 samples into a ring of 64: the 16 oldest are overwritten
    assert recorder.drain()[1]["dropped"] == 2 * TOKENS - 64
