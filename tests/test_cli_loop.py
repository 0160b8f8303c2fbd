"""The command line as users run it: trace -> plan -> inspect -> serve-args -> export -> stock vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from reference import pruned_reference_logprobs
from vllm_engine import ENGINE_KWARGS, max_abs_diff, reference_token_logprobs
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.traces import load_traces

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MAX_TOKENS = 4


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_moe_prune.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def loop(testbed, tmp_path_factory):
    work = tmp_path_factory.mktemp("loop")
    prompts = testbed / "data" / "python" / "traffic.jsonl"
    traced = cli("trace", "--model", str(testbed), "--prompts", str(prompts), "--out", str(work / "traces"),
                 "--label", "python", "--max-tokens", str(MAX_TOKENS), "--sample-rate", "0.5", "--enforce-eager",
                 "--dtype", "float32")
    assert traced.returncode == 0, traced.stderr[-3000:]
    planned = cli("plan", "--model", str(testbed), "--traces", str(work / "traces"), "--method", "frequency",
                  "--budget", "50%", "--out", str(work / "plan.yaml"))
    assert planned.returncode == 0, planned.stderr[-3000:]
    return work, traced, planned


def test_trace_counts_every_token(loop, testbed):
    work, traced, _ = loop
    tokenizer = AutoTokenizer.from_pretrained(testbed)
    texts = [json.loads(line)["prompt"] for line in (testbed / "data/python/traffic.jsonl").read_text().splitlines()]
    expected = sum(len(tokenizer(t).input_ids) + MAX_TOKENS - 1 for t in texts)
    traces = load_traces(work / "traces")
    assert traces.tokens == expected and traces.labels == {"python": expected}
    shard = traces.shards[0]
    assert 0 < shard.samples < expected  # rate 0.5: some, not all
    assert "traced" in traced.stdout


def test_plan_inspect_serve_args(loop, testbed):
    work, _, planned = loop
    plan = Plan.load(work / "plan.yaml")
    assert list(plan.experts_per_layer.values()) == [8, 8, 8, 8]
    assert plan.provenance["traces"]["tokens"] == load_traces(work / "traces").tokens
    inspected = cli("inspect", str(work / "plan.yaml"), "--traces", str(work / "traces"))
    assert inspected.returncode == 0 and "8/16" in inspected.stdout, inspected.stderr
    args = cli("serve-args", "--model", str(testbed), "--plan", str(work / "plan.yaml"), "--yaml", str(work / "serve.yaml"))
    assert args.returncode == 0
    assert "--load-format moe_prune" in args.stdout and "VLLM_PLUGINS=moe_prune,moe_prune_endpoints" in args.stdout
    assert (work / "serve.yaml").is_file()


def test_impossible_budget_is_one_clear_line_and_no_file(loop, testbed):
    work, _, _ = loop
    out = cli("plan", "--model", str(testbed), "--traces", str(work / "traces"), "--method", "frequency",
              "--budget", "1%", "--out", str(work / "tiny.yaml"))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-moe-prune plan: error: budget '1%' is too small") and "12.5%" in last
    assert "Traceback" not in out.stderr
    assert not (work / "tiny.yaml").exists()


def test_uniform_export_serves_in_stock_vllm(loop, testbed):
    from vllm import LLM

    from vllm_moe_prune_plugins.offline import prompt_logprobs

    work, _, _ = loop
    exported = cli("export", "--model", str(testbed), "--plan", str(work / "plan.yaml"), "--out", str(work / "pruned"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(work / "pruned")
    texts = [json.loads(line)["text"] for line in (testbed / "data/c/heldout.jsonl").read_text().splitlines()[:3]]
    prompts = [tokenizer(t).input_ids[:80] for t in texts]
    llm = LLM(model=str(work / "pruned"), enforce_eager=True, **ENGINE_KWARGS)  # stock vLLM, no plugin flags
    try:
        got = prompt_logprobs(llm, prompts)
    finally:
        llm.llm_engine.engine_core.shutdown()
    plan = Plan.load(work / "plan.yaml")
    want = reference_token_logprobs(pruned_reference_logprobs(testbed, plan.kept, prompts), prompts)
    assert max_abs_diff(got, want) < 2e-3
