"""Serving pruned variants from the original checkpoint through --load-format moe_prune.

Every served variant's prompt log-probabilities are compared with transformers running
the same pruned model (tests/reference.py: router restricted to the kept experts), and
its routing capture with what that model routes (tests/routing_reference.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import torch

from reference import load_float32, pruned_reference_logprobs, restrict_routing, tiny_checkpoint
from routing_reference import reference_stats
from vllm_engine import ENGINE_KWARGS, domain_prompts, max_abs_diff, reference_token_logprobs
from vllm_moe_prune_plugins.offline import TracingLLM, prompt_logprobs
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.export import export_pruned
from vllm_moe_prune.plan import Plan

pytestmark = pytest.mark.engine

#: float32 end to end; differences come from kernel summation order only.
LOGPROB_ATOL = 2e-3


def make_plan(model_dir: Path, counts: list[int], path: Path, seed: int = 0) -> Plan:
    """A plan keeping ``counts[i]`` pseudo-random experts of the i-th MoE layer (as many of
    every routing group: DeepSeek routes inside groups)."""
    ckpt = Checkpoint.open(model_dir)
    shape = ckpt.shape
    size = shape.num_experts // shape.num_groups
    rng = random.Random(seed)
    kept = {
        layer: [g * size + e for g in range(shape.num_groups) for e in rng.sample(range(size), n // shape.num_groups)]
        for layer, n in zip(shape.moe_layers, counts)
    }
    plan = Plan.for_checkpoint(ckpt, kept, "test")
    plan.save(path)
    return plan


def serve_and_compare(model_dir: Path, plan_path: Path | None, prompts: list[list[int]], **kwargs) -> dict:
    plan = Plan.load(plan_path) if plan_path else None
    with TracingLLM(model_dir, plan_path, **{**ENGINE_KWARGS, **kwargs}) as engine:
        engine.set_tracing(True)
        got = prompt_logprobs(engine.llm, prompts)
        stats, info = engine.drain()
        status = engine.status()
    # A compiled engine checked its first served step against its eager model (compile_check.py).
    assert status["compile_check"]["state"] == ("not compiled" if kwargs.get("enforce_eager") else "passed")
    want = reference_token_logprobs(pruned_reference_logprobs(model_dir, plan.kept if plan else None, prompts), prompts)
    return {"diff": max_abs_diff(got, want), "stats": stats, "info": info, "status": status, "plan": plan}


def test_testbed_non_uniform_plan(testbed, tmp_path):
    ckpt = Checkpoint.open(testbed)
    plan = make_plan(testbed, [12, 6, 9, 3], tmp_path / "plan.yaml")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    prompts = domain_prompts(testbed, tokenizer, per_domain=2, max_tokens=80)
    result = serve_and_compare(testbed, tmp_path / "plan.yaml", prompts)
    assert result["diff"] < LOGPROB_ATOL
    # Only kept experts were read from disk: the pruned experts' bytes exactly are missing.
    assert result["info"]["bytes_read"] == ckpt.total_bytes - plan.predicted["routed_expert_bytes_pruned"]
    assert result["info"]["plan_id"] == plan.plan_id
    # ... and only kept experts are resident in the engine.
    assert result["status"]["expert_bytes_resident"] == plan.predicted["routed_expert_bytes_kept"]
    # Capture on the variant: original ids, only kept experts routed, exact totals.
    stats = result["stats"]
    stats.validate()
    assert stats.tokens == sum(len(p) for p in prompts)
    for i, layer in enumerate(ckpt.shape.moe_layers):
        pruned = sorted(set(range(ckpt.shape.num_experts)) - set(plan.kept[layer]))
        assert int(stats.counts[i, pruned].sum()) == 0
    # The full router still sees all experts: coverage of the kept set is below 1.
    assert float(stats.kept_mass(plan.kept).min()) < 1.0


#: Non-uniform kept counts per MoE layer; DeepSeek's are whole groups (V2: 4 groups of 2
#: experts, 2 picked per token; V3: 2 groups of 4, 1 picked, ranked by its two best).
NON_UNIFORM = {"qwen3_moe": [7, 5, 3], "qwen2_moe": [7, 5, 3], "mixtral": [7, 5, 3], "olmoe": [7, 5, 3],
               "deepseek_v2": [8, 4], "deepseek_v3": [6, 4]}
#: Grouped routing's capture is also run compiled (the testbed's softmax routing is in test_capture).
COMPILED = {"deepseek_v2", "deepseek_v3"}


@pytest.mark.parametrize("uniform", [False, True], ids=["non-uniform", "uniform"])
@pytest.mark.parametrize("family", list(NON_UNIFORM))
def test_family_plan(family, uniform, tiny_root, tmp_path):
    """Every served family: logprobs equal the pruned reference, and its routing capture
    (original ids, the family's own routing rule) equals what transformers routes."""
    model_dir = tiny_checkpoint(family, tiny_root)
    ckpt = Checkpoint.open(model_dir)
    counts = [4] * len(ckpt.shape.moe_layers) if uniform else NON_UNIFORM[family]
    assert len(counts) == len(ckpt.shape.moe_layers)
    plan = make_plan(model_dir, counts, tmp_path / "plan.yaml", seed=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 400) for _ in range(n)] for n in (17, 40, 29)]
    eager = uniform or family not in COMPILED
    result = serve_and_compare(model_dir, tmp_path / "plan.yaml", prompts, enforce_eager=eager)
    assert result["diff"] < LOGPROB_ATOL
    # The reference itself must be able to fail: pruning changes this model's output.
    full = reference_token_logprobs(pruned_reference_logprobs(model_dir, None, prompts), prompts)
    pruned = reference_token_logprobs(pruned_reference_logprobs(model_dir, plan.kept, prompts), prompts)
    assert max_abs_diff(full, pruned) > 50 * LOGPROB_ATOL
    model = load_float32(model_dir)
    restrict_routing(model, ckpt.shape, plan.kept)
    expected = reference_stats(model, ckpt.shape, prompts)
    stats = result["stats"]
    assert stats.tokens == int(expected["tokens"])
    assert torch.equal(stats.counts, expected["counts"])
    assert torch.equal(stats.transitions, expected["transitions"])
    torch.testing.assert_close(stats.prob_sum, expected["prob_sum"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.gate_sum, expected["gate_sum"], rtol=1e-4, atol=1e-3)


def test_non_uniform_export_serves_through_the_plugin(testbed, tmp_path):
    """An export of a non-uniform plan serves two ways, equal to the pruned reference.

    Through the flags of ``serve-args --model EXPORT`` (moe_prune loader, no plan), and
    through a plain ``vllm.LLM(EXPORT)``: the export names the plugin's model class, which
    builds each layer with the count the export recorded (as ``vllm serve EXPORT`` does).
    """
    from vllm import LLM

    plan = make_plan(testbed, [12, 6, 9, 3], tmp_path / "plan.yaml", seed=3)
    export = export_pruned(testbed, plan, tmp_path / "export")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    prompts = domain_prompts(testbed, tokenizer, per_domain=1, max_tokens=80)
    want = reference_token_logprobs(pruned_reference_logprobs(testbed, plan.kept, prompts), prompts)

    with TracingLLM(export, **ENGINE_KWARGS, enforce_eager=True) as engine:
        engine.set_tracing(True)
        via_serve_args = prompt_logprobs(engine.llm, prompts)
        stats, info = engine.drain()
        status = engine.status()
    assert max_abs_diff(via_serve_args, want) < LOGPROB_ATOL
    ckpt = Checkpoint.open(export)
    assert info["bytes_read"] == ckpt.total_bytes
    assert status["expert_bytes_resident"] == plan.predicted["routed_expert_bytes_kept"]
    assert status["experts_per_layer"] == {str(k): v for k, v in plan.experts_per_layer.items()}
    # Traced in the export's own ids: each layer routes to, and gives probability to,
    # only the experts it holds, and its probability sums are a full distribution.
    stats.validate()
    assert stats.tokens == sum(len(p) for p in prompts)
    for i, n in enumerate(plan.experts_per_layer.values()):
        assert int(stats.counts[i, n:].sum()) == 0 and float(stats.prob_sum[i, n:].sum()) == 0.0
        assert abs(float(stats.prob_sum[i].sum()) - stats.tokens) < 1e-3 * stats.tokens

    llm = LLM(model=str(export), **ENGINE_KWARGS, enforce_eager=True)
    try:
        plain = prompt_logprobs(llm, prompts)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert max_abs_diff(plain, want) < LOGPROB_ATOL


def test_tensor_parallel_two_workers(testbed, tmp_path, monkeypatch):
    """The variant shards over two CPU workers (vLLM's own TP sharding of the kept experts).

    vLLM's automatic thread binding wants one NUMA node per worker; this machine has one,
    so each worker is bound to one core by hand.
    """
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    make_plan(testbed, [10, 4, 7, 16], tmp_path / "plan.yaml", seed=2)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(testbed)
    prompts = domain_prompts(testbed, tokenizer, per_domain=1, max_tokens=64)
    result = serve_and_compare(testbed, tmp_path / "plan.yaml", prompts, tensor_parallel_size=2, enforce_eager=True)
    assert result["diff"] < LOGPROB_ATOL
    assert result["stats"].tokens == sum(len(p) for p in prompts)


def test_engine_refuses_flags_that_do_not_match_the_plan(testbed, tmp_path, capfd):
    """Fail closed in the engine too: hand-edited flags never load a mismatched variant."""
    from vllm import LLM

    from vllm_moe_prune.serving import engine_args

    make_plan(testbed, [8, 8, 8, 8], tmp_path / "plan.yaml")
    args = engine_args(testbed, tmp_path / "plan.yaml")
    args["hf_overrides"]["moe_prune_experts_per_layer"] = {"0": 8, "1": 8, "2": 8, "3": 9}
    with pytest.raises(Exception):
        LLM(**args, **ENGINE_KWARGS, enforce_eager=True)
    captured = capfd.readouterr()
    err = captured.out + captured.err  # engine processes log to either
    assert "do not match plan" in err and "regenerate the flags with `vllm-moe-prune serve-args`" in err


@pytest.mark.parametrize(("parallel", "named"), [
    ({"enable_expert_parallel": True}, "expert parallelism (--enable-expert-parallel) is not supported"),
    ({"pipeline_parallel_size": 2}, "pipeline parallelism is not supported by the moe_prune model classes"),
], ids=["expert", "pipeline"])
def test_unsupported_parallelism_is_refused(parallel, named, testbed, capfd, monkeypatch):
    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per pipeline stage

    from vllm_moe_prune.serving import engine_args

    with pytest.raises(Exception):
        LLM(**engine_args(testbed), **ENGINE_KWARGS, enforce_eager=True, **parallel)
    captured = capfd.readouterr()
    assert named in captured.out + captured.err


def test_plain_rope_deepseek_is_refused_on_cpu(tiny_root, tmp_path, capfd):
    """vLLM's CPU build computes plain-rope MLA wrongly: refuse rather than serve it."""
    import json
    import shutil

    from vllm import LLM

    from vllm_moe_prune.serving import engine_args

    model_dir = tmp_path / "plain-rope"
    shutil.copytree(tiny_checkpoint("deepseek_v2", tiny_root), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception):
        LLM(**engine_args(model_dir), **ENGINE_KWARGS, enforce_eager=True)
    captured = capfd.readouterr()
    assert "DeepSeek without rope scaling is computed wrongly by vLLM's CPU build" in captured.out + captured.err


def test_data_parallelism_is_refused(testbed):
    """vLLM's offline engine refuses data parallelism itself, and a server with
    --data-parallel-size 2 needs two engines on two cores: the model class is built here
    from the real engine configuration such a server would create, and refuses before
    building any layer."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_moe_prune.serving import engine_args
    from vllm_moe_prune_plugins import models

    config = EngineArgs(**engine_args(testbed), **ENGINE_KWARGS, data_parallel_size=2).create_engine_config()
    model_class = getattr(models, Checkpoint.open(testbed).shape.family.pruned_architecture)
    with pytest.raises(ValueError, match="data parallelism is not supported by the moe_prune model classes"):
        model_class(vllm_config=config)
