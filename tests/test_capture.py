"""Routing capture inside a real vLLM engine (torch.compile on) against transformers."""

from __future__ import annotations

import pytest
import torch

from vllm_engine import ENGINE_KWARGS, domain_prompts
from reference import load_float32
from routing_reference import reference_stats
from vllm_moe_prune.checkpoint import Checkpoint

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(testbed):
    from vllm_moe_prune_plugins.offline import TracingLLM

    with TracingLLM(testbed, sample_capacity=4096, **ENGINE_KWARGS) as llm:
        yield llm


def _generate(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = engine.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]


def test_nothing_is_counted_before_tracing_starts(engine):
    # vLLM's profiling and warm-up passes ran during start-up; none may be in the trace.
    stats, info = engine.drain()
    assert stats.tokens == 0 and int(stats.counts.sum()) == 0
    assert info["plan_id"] == "full"


def test_counts_equal_transformers(engine, testbed):
    model = load_float32(testbed)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    prompts = domain_prompts(testbed, tokenizer, per_domain=2, max_tokens=64)
    engine.set_tracing(True)
    sequences = _generate(engine, prompts, max_tokens=6)
    engine.set_tracing(False)
    stats, _ = engine.drain()
    # The last generated token is returned but never fed through the model.
    expected = reference_stats(model, Checkpoint.open(testbed).shape, [s[:-1] for s in sequences])
    assert stats.tokens == int(expected["tokens"]) == sum(len(s) - 1 for s in sequences)
    assert torch.equal(stats.counts, expected["counts"])
    assert torch.equal(stats.transitions, expected["transitions"])
    torch.testing.assert_close(stats.prob_sum, expected["prob_sum"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.gate_sum, expected["gate_sum"], rtol=1e-4, atol=1e-3)
    stats.validate()


def test_many_simultaneous_requests_lose_no_count(engine, testbed):
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    base = domain_prompts(testbed, tokenizer, per_domain=6, max_tokens=48)
    prompts = [p[: 8 + (i % 40)] for i, p in enumerate(base * 3)]  # 72 requests, varied lengths
    engine.set_tracing(True)
    sequences = _generate(engine, prompts, max_tokens=12)
    engine.set_tracing(False)
    stats, _ = engine.drain()
    assert stats.tokens == sum(len(p) + 12 - 1 for p in prompts)
    assert stats.counts.sum(dim=1).tolist() == [stats.tokens * stats.top_k] * stats.num_layers
    assert len(sequences) == len(prompts)


def test_tracing_off_counts_nothing(engine, testbed):
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    _generate(engine, domain_prompts(testbed, tokenizer, per_domain=1), max_tokens=4)
    stats, _ = engine.drain()
    assert stats.tokens == 0 and int(stats.counts.sum()) == 0


def test_sampling_records_every_token_routing_at_rate_one(engine, testbed):
    """With rate 1 every traced token is sampled: its per-layer top-k equals transformers'."""
    model = load_float32(testbed)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    prompts = domain_prompts(testbed, tokenizer, per_domain=1, max_tokens=30)
    engine.set_sample_rate(1.0)
    engine.set_tracing(True)
    sequences = _generate(engine, prompts, max_tokens=4)
    engine.set_tracing(False)
    engine.set_sample_rate(0.0)
    stats, _, samples = engine.drain(with_samples=True)
    assert samples is not None and len(samples) == stats.tokens == sum(len(s) - 1 for s in sequences)
    # Sampled ids reproduce the counters exactly.
    for slot in range(stats.num_layers):
        hist = torch.bincount(samples.topk_ids[:, slot].flatten().long(), minlength=stats.num_experts)
        assert torch.equal(hist, stats.counts[slot])
    # The multiset of per-token routings equals transformers' (order depends on batching).
    want = []
    with torch.no_grad():
        for seq in sequences:
            out = model(torch.tensor([seq[:-1]]), output_router_logits=True)
            per_layer = [lg.float().topk(stats.top_k, dim=-1).indices.sort(dim=-1).values for lg in out.router_logits]
            want += [tuple(tuple(layer[t].tolist()) for layer in per_layer) for t in range(len(seq) - 1)]
    got = [tuple(tuple(sorted(row)) for row in token.tolist()) for token in samples.topk_ids]
    assert sorted(got) == sorted(want)
    assert bool((samples.topk_probs > 0).all()) and bool((samples.topk_probs <= 1).all())
