"""The routing recorder compiled by torch.compile (as vLLM compiles a model) equals eager.

The engine tests compare capture with transformers; this one isolates the compiler for
every routing rule (softmax top-k; DeepSeek-V2 grouped by best expert; DeepSeek-V3
sigmoid + score bias, grouped by best two), pruned, at two batch sizes through one
dynamic-shape graph. Compiler bugs depend on the whole graph: the one that made inductor
reuse a concatenation's memory while a view of it was still to be read (wrong transitions,
compiled only) showed in the DeepSeek-V3 engine test (tests/test_loader.py), not here.
"""

from __future__ import annotations

import pytest
import torch

from reference import tiny_checkpoint
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune_plugins.capture import RoutingRecorder

#: Kept experts per MoE layer, whole groups for DeepSeek (V2: 4 groups of 2; V3: 2 of 4).
KEPT = {"qwen3_moe": [[0, 1, 2, 4, 5, 6, 7], [1, 3, 4, 7], [0, 1, 2, 3, 4, 5, 6, 7]],
        "deepseek_v2": [[0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 5, 6]],
        "deepseek_v3": [[0, 1, 2, 4, 5, 6], [1, 3, 4, 7]]}


@pytest.mark.parametrize("family", list(KEPT))
def test_compiled_recording_equals_eager(family, tiny_root):
    shape = Checkpoint.open(tiny_checkpoint(family, tiny_root)).shape
    generator = torch.Generator().manual_seed(0)
    hidden_size, tokens = 64, 40
    layers = [
        (torch.randn(shape.num_experts, hidden_size, generator=generator), torch.zeros(shape.num_experts),
         torch.randn(shape.num_experts, generator=generator) * 0.1 if shape.scoring == "sigmoid" else None,
         torch.tensor(kept))
        for kept in KEPT[family]
    ]
    hidden = [torch.randn(tokens, hidden_size, generator=generator) for _ in layers]

    def forward(recorder: RoutingRecorder, hidden: list[torch.Tensor]) -> None:
        for slot, (router, router_bias, score_bias, kept) in enumerate(layers):
            recorder.record(hidden[slot], router, router_bias, score_bias, kept, slot)

    eager, compiled = RoutingRecorder(shape, 256), RoutingRecorder(shape, 256)
    for recorder in (eager, compiled):
        recorder.set_active(True)
    step = torch.compile(lambda h: forward(compiled, h), dynamic=True)
    for cut in (tokens, 23):  # two batch sizes through one dynamic-shape graph
        forward(eager, [h[:cut] for h in hidden])
        step([h[:cut] for h in hidden])
    want, _ = eager.drain()
    got, _ = compiled.drain()
    assert got.tokens == want.tokens == tokens + 23
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.transitions, want.transitions)
    assert int(want.transitions.sum()) == (len(layers) - 1) * want.tokens * shape.top_k**2
    torch.testing.assert_close(got.prob_sum, want.prob_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.gate_sum, want.gate_sum, rtol=1e-5, atol=1e-5)
    for slot, (_, _, _, kept) in enumerate(layers):  # only kept experts are routed to
        pruned = sorted(set(range(shape.num_experts)) - set(kept.tolist()))
        assert int(want.counts[slot, pruned].sum()) == 0
