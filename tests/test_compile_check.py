"""The check that vLLM's compiled model computes what its eager model does (compile_check.py).

The comparison is tested on hand-made outputs; the engine's use of it on a real compiled
engine of the testbed, whose compiled model is made to compute something else (a real
miscompile cannot be had on demand, so one is stood in for; see ``_miscompile``).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from reference import pruned_reference_logprobs
from test_loader import LOGPROB_ATOL
from vllm_engine import ENGINE_KWARGS, max_abs_diff, reference_token_logprobs
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune_plugins.capture import RoutingRecorder
from vllm_moe_prune_plugins.compile_check import FAILED, HALF_TOLERANCE, PASSED, CompileCheck, relative_error
from vllm_moe_prune_plugins.offline import TracingLLM, prompt_logprobs


def _judged(compiled: torch.Tensor, eager: torch.Tensor) -> CompileCheck:
    check = CompileCheck.for_model(compiled=True)
    check.judge(compiled, eager)
    return check


def test_fusion_rounding_passes_and_a_stale_read_fails():
    torch.manual_seed(0)
    eager = torch.randn(64, 32)
    rounded = eager * (1 + 1e-6 * torch.randn_like(eager))  # what reordered float sums do
    assert _judged(eager.clone(), eager).as_dict() == {"state": PASSED, "relative_error": 0.0, "tolerance": 1e-3}
    check = _judged(rounded, eager)
    assert check.state == PASSED and 0 < check.relative_error < 1e-5
    stale = eager.clone()
    stale[5] = eager[6]  # one token computed from another's memory
    check = _judged(stale, eager)
    # Hand-computed: |row 6 - row 5| / |eager|.
    expected = float((eager[6].double() - eager[5].double()).norm() / eager.double().norm())
    assert check.state == FAILED and check.relative_error == pytest.approx(expected, rel=1e-12)


def test_non_finite_values_must_agree_exactly():
    eager = torch.tensor([[1.0, float("nan"), float("inf")], [2.0, 3.0, -float("inf")]])
    assert relative_error(eager.clone(), eager) == 0.0
    for position, value in (((0, 0), float("nan")), ((1, 1), float("inf")), ((0, 2), -float("inf")), ((0, 1), 0.0)):
        compiled = eager.clone()
        compiled[position] = value
        assert relative_error(compiled, eager) == float("inf"), position
    assert relative_error(eager[:1], eager) == float("inf")  # another shape


def test_sixteen_bit_outputs_get_a_wider_tolerance():
    torch.manual_seed(0)
    eager = torch.randn(64, 32).bfloat16()
    rounded = (eager.float() * (1 + 4e-3 * torch.randn(64, 32))).bfloat16()  # about one bfloat16 ulp
    check = _judged(rounded, eager)
    assert check.tolerance == HALF_TOLERANCE and check.state == PASSED
    assert _judged(torch.zeros_like(eager), eager).state == FAILED  # an output never written


def test_discarding_writes_restores_what_the_graph_records(testbed):
    shape = replace(Checkpoint.open(testbed).shape, moe_layers=(0, 1))
    experts, top_k = shape.num_experts, shape.top_k
    recorder = RoutingRecorder(
        shape, hidden_size=8, max_tokens=16, routed=[experts, experts - 1], held=[experts] * 2, count_batch_tokens=8
    )
    recorder.set_router(1, torch.randn(experts, 8), list(range(1, experts)))
    recorder.set_active(True)

    def step(num_tokens: int) -> None:
        for slot, routed in enumerate(recorder.routed):
            logits = torch.randn(num_tokens, routed)
            gates, ids = logits.softmax(-1).topk(top_k)
            recorder.record(slot, torch.randn(num_tokens, 8), logits, gates, ids)

    step(3)  # a step that waits to be counted
    before = {name: getattr(recorder, name).clone() for name in RoutingRecorder.GRAPH_WRITES}
    with recorder.discarding_writes():
        step(5)
        assert not torch.equal(recorder.prob_totals, before["prob_totals"])
    for name, value in before.items():
        assert torch.equal(getattr(recorder, name), value), name


def _miscompile(worker) -> None:
    """Stand-in for a miscompile, run in the worker: every output of the compiled model,
    and only of the compiled model, is shifted by one. (vLLM runs the model eagerly when
    it is told not to compile, or when the forward context says to skip the compiled one.)"""
    from vllm.forward_context import get_forward_context

    inner = worker.model_runner.get_model().model
    compiled_class = type(inner)

    class Miscompiled(compiled_class):
        def __call__(self, *args, **kwargs):
            out = compiled_class.__call__(self, *args, **kwargs)
            eager = self.do_not_compile or get_forward_context().skip_compiled
            return out if eager else out + 1.0

    inner.__class__ = Miscompiled


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 400) for _ in range(n)] for n in (23, 41, 9)]


@pytest.mark.engine
@pytest.mark.slow
def test_a_compiled_model_that_computes_otherwise_is_served_eagerly(testbed, monkeypatch, capfd):
    """The compiled engine of the testbed, made to miscompute, still serves the reference's
    log-probabilities: at the first served step (the check's eager run) and after it
    (eager from then on); and that step's routing is counted once."""
    first, later = _prompts(0), _prompts(1)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to send _miscompile to the worker
    with TracingLLM(testbed, **ENGINE_KWARGS) as engine:
        assert engine.status()["compile_check"]["state"] == "pending"
        engine.llm.collective_rpc(_miscompile)
        engine.set_tracing(True)
        got_first = prompt_logprobs(engine.llm, first)
        check = engine.status()["compile_check"]
        fallback = engine.llm.collective_rpc("moe_prune_peek")[0]["eager_fallback"]  # moe_prune_eager_fallback
        got_later = prompt_logprobs(engine.llm, later)
        stats, _ = engine.drain()
    assert check["state"] == FAILED and check["relative_error"] > 100 * check["tolerance"] and fallback
    log = "".join(capfd.readouterr())  # the engine's processes log to this process's stdout and stderr
    assert "runs eagerly from now on" in log and "MOE_PRUNE_INDUCTOR_REORDER=0" in log
    for prompts, got in ((first, got_first), (later, got_later)):
        want = reference_token_logprobs(pruned_reference_logprobs(testbed, None, prompts), prompts)
        assert max_abs_diff(got, want) < LOGPROB_ATOL
    assert stats.tokens == sum(map(len, first + later))
    layers = len(stats.moe_layers)
    assert torch.equal(stats.counts.sum(dim=1), torch.full((layers,), stats.tokens * stats.top_k))
    # Every token's full softmax sums to 1: no step's probabilities were added twice.
    torch.testing.assert_close(stats.prob_sum.sum(dim=1), torch.full((layers,), float(stats.tokens), dtype=torch.float64))
