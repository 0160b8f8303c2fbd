"""Helpers shared by the engine benchmarks (tracing_overhead, quality, serving).

Not a benchmark itself. Engines never generate at the same time (tracing_overhead keeps
one engine per variant alive and lets them take turns; the others run one at a time), and
every script that starts one must be run from a ``__main__`` guard (vLLM spawns its
engine processes).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.testbed import TESTBED_MODEL
from vllm_moe_prune.testbed.corpus import DOMAINS

RESULTS = Path(__file__).resolve().parent / "results"
#: Engine settings every benchmark uses (float32 like the tests: logprobs comparable with transformers).
ENGINE_KWARGS: dict[str, Any] = {"dtype": "float32", "max_model_len": 512, "seed": 0}


def load_jsonl(path: Path, key: str, limit: int | None = None) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()][:limit]
    return [json.loads(line)[key] for line in lines]


def tokenizer(model: Path = TESTBED_MODEL) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def traffic_ids(model: Path, domains: tuple[str, ...] | list[str], per_domain: int | None) -> dict[str, list[list[int]]]:
    """Token ids of each domain's traffic prompts (``data/<domain>/traffic.jsonl``)."""
    tok = tokenizer(model)
    return {d: [tok(t).input_ids for t in load_jsonl(model / "data" / d / "traffic.jsonl", "prompt", per_domain)]
            for d in domains}


def heldout_ids(model: Path, max_len: int = 256) -> dict[str, list[list[int]]]:
    """Token ids of each domain's held-out texts, cut to ``max_len`` tokens (as the demo does)."""
    tok = tokenizer(model)
    return {d: [tok(t).input_ids[:max_len] for t in load_jsonl(model / "data" / d / "heldout.jsonl", "text")]
            for d in DOMAINS}


def environment() -> dict[str, Any]:
    import vllm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_results(name: str, data: dict[str, Any], table: str, output: Path = RESULTS) -> None:
    write_text_atomic(output / f"{name}.json", json.dumps(data, indent=2) + "\n")
    write_text_atomic(output / f"{name}.md", table)


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its children (vLLM's engine and worker processes).

    Less sensitive than wall time to other processes sharing the machine's cores.
    """
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def greedy_round(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """Generate ``max_tokens`` tokens for every prompt (greedy, ignore_eos); wall and CPU time, token counts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    cpu0 = process_tree_cpu_seconds()
    started = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    cpu_seconds = process_tree_cpu_seconds() - cpu0
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tok_s": output_tokens / seconds,
        "total_tok_s": (output_tokens + prompt_tokens) / seconds,
        "output_tok_per_cpu_s": output_tokens / cpu_seconds if cpu_seconds > 0 else float("nan"),
    }


def shutdown(llm: Any) -> None:
    """Stop a plain ``vllm.LLM``'s engine processes now (what ``TracingLLM.close`` does)."""
    llm.llm_engine.engine_core.shutdown()
