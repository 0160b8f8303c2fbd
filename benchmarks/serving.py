"""Serving the full testbed model vs a pruned variant (default: frequency plan keeping 50%).

Measured side by side in one run (engines started one after another, interleaved):

* resident routed-expert bytes (worker status ``expert_bytes_resident``); the pruned
  variant's must equal the plan's kept bytes exactly;
* bytes of tensor data read from the checkpoint during load (``load_info.bytes_read``),
  and the same read path timed alone (safetensors, page cache warm);
* engine start-up time (``vllm.LLM`` construction: load, compile or cache hit, warm-up);
* throughput on the same prompts (greedy, ignore_eos, counters on as in production)
  with an ample KV cache (``VLLM_CPU_KVCACHE_SPACE=1`` GiB): does a pruned variant
  compute faster or slower per token?
* **the same memory budget**: weights + KV cache held constant. The full model gets a KV
  cache of ``--kv-fraction`` x its weight bytes; the pruned variant gets that PLUS the
  routed-expert bytes it does not hold (``kv_cache_memory_bytes``, exact on the CPU
  backend). Reported: KV-cache tokens each engine allocated, how many requests of the
  workload's length fit at once, and throughput on ``--mem-requests`` requests, a load
  where the KV cache is what limits the batch.

Everything runs with torch.compile (production mode) unless ``--eager``.

    flock /tmp/vllm-engine.lock python benchmarks/serving.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import ENGINE_KWARGS, RESULTS, environment, greedy_round, spread, traffic_ids, write_results
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.testbed import TESTBED_MODEL
from vllm_moe_prune.testbed.corpus import DOMAINS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TESTBED_MODEL, help="model directory (default: the testbed)")
    parser.add_argument("--method", default="frequency", help="planning method of the pruned variant")
    parser.add_argument("--budget", default="50%", help="budget of the pruned variant (share of routed experts kept)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per throughput round (mixed domains)")
    parser.add_argument("--max-tokens", type=int, default=128, help="generated tokens per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine start")
    parser.add_argument("--reps", type=int, default=2, help="engine starts per variant and part (interleaved)")
    parser.add_argument("--kv-fraction", type=float, default=0.25,
                        help="equal-memory part: the full model's KV cache as a share of its weight bytes")
    parser.add_argument("--mem-requests", type=int, default=128, help="equal-memory part: requests per round")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: torch.compile)")
    parser.add_argument("--workdir", type=Path, help="traces and plan (default: runs/serving-<time>)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for serving.json/.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def kv_bytes_per_token(model: Path, dtype_bytes: int = 4) -> int:
    """K and V of every attention layer for one token (float32 cache, as the engines run)."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype_bytes


def _explicit_kv_class() -> type:
    from vllm_moe_prune.serving import engine_args
    from vllm_moe_prune_plugins.offline import TracingLLM

    class ExplicitKV(TracingLLM):
        """TracingLLM that leaves VLLM_CPU_KVCACHE_SPACE unset, so ``kv_cache_memory_bytes`` is what counts."""

        def __init__(self, model: Path, plan: Path | None, **llm_kwargs: Any) -> None:
            from vllm import LLM

            self.args = engine_args(model, plan)
            self.llm = LLM(**self.args, **llm_kwargs)

    return ExplicitKV


def run_engine(args: argparse.Namespace, plan_path: Path | None, prompts: list[list[int]], *,
               kv_bytes: int | None = None, trace: tuple[dict[str, list[list[int]]], Path] | None = None
               ) -> dict[str, Any]:
    from vllm_moe_prune_plugins.offline import TracingLLM, trace_labelled

    ExplicitKVTracingLLM = _explicit_kv_class()
    kwargs = dict(ENGINE_KWARGS, enforce_eager=args.eager)
    engine_class = TracingLLM
    saved_kv_env = None
    if kv_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_bytes
        engine_class = ExplicitKVTracingLLM
        # On the CPU backend the legacy VLLM_CPU_KVCACHE_SPACE overrides kv_cache_memory_bytes.
        saved_kv_env = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    started = time.perf_counter()
    try:
        engine = engine_class(args.model, plan_path, **kwargs)
    finally:
        if saved_kv_env is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved_kv_env
    with engine:
        startup = time.perf_counter() - started
        cache = engine.llm.llm_engine.vllm_config.cache_config
        engine.drain()
        if trace is not None:  # replay traffic with capture: the statistics the plan is made from
            traffic, trace_dir = trace
            trace_labelled(engine, traffic, 16, trace_dir, Checkpoint.open(args.model).fingerprint)
        engine.set_tracing(True)  # production: counters on
        greedy_round(engine.llm, prompts[: max(8, len(prompts) // 8)], 16)  # warm-up
        rounds = [greedy_round(engine.llm, prompts, args.max_tokens) for _ in range(args.rounds)]
        status = engine.status()
        _, load_info = engine.drain()
    return {
        "variant": "full" if plan_path is None else "pruned",
        "startup_s": round(startup, 2),
        "expert_bytes_resident": status["expert_bytes_resident"],
        "experts_per_layer": status["experts_per_layer"],
        "bytes_read": load_info["bytes_read"],
        "plan_id": load_info["plan_id"],
        "kv_cache_memory_bytes": kv_bytes,
        "kv_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "rounds": rounds,
    }


def timed_checkpoint_read(model: Path, kept: dict[int, list[int]] | None) -> tuple[float, int]:
    """The loader's read path alone: read the kept tensors from the safetensors files."""
    from safetensors import safe_open

    from vllm_moe_prune.remap import PrunedLayout

    ckpt = Checkpoint.open(model)
    shape = ckpt.shape
    layout = PrunedLayout(shape, kept or ckpt.experts)
    started, read = time.perf_counter(), 0
    for file in sorted({info.file for info in ckpt.tensors.values()}):
        with safe_open(ckpt.path / file, framework="pt") as f:
            for name in f.keys():
                if layout.remap(name) is None:
                    continue
                tensor = f.get_tensor(name)
                read += tensor.numel() * tensor.element_size()
    return time.perf_counter() - started, read


def _tok_s(engines: list[dict[str, Any]], variant: str) -> list[float]:
    return [r["output_tok_s"] for e in engines if e["variant"] == variant for r in e["rounds"]]


def _ratios(engines: list[dict[str, Any]]) -> list[float]:
    """Per repetition: median round of pruned / median round of full."""
    out = []
    for rep in sorted({e["rep"] for e in engines}):
        full = [r["output_tok_s"] for e in engines if e["rep"] == rep and e["variant"] == "full" for r in e["rounds"]]
        pruned = [r["output_tok_s"] for e in engines if e["rep"] == rep and e["variant"] == "pruned" for r in e["rounds"]]
        if full and pruned:
            out.append(statistics.median(pruned) / statistics.median(full))
    return out


def markdown(res: dict[str, Any]) -> str:
    a, m, c = res["ample"], res["equal_memory"], res["config"]
    mode = "eager" if c["eager"] else "torch.compile"
    f_a = [e for e in a if e["variant"] == "full"]
    p_a = [e for e in a if e["variant"] == "pruned"]
    f0, p0 = f_a[0], p_a[0]
    rd = res["checkpoint_read"]
    lines = [
        f"Serving the testbed: full model vs `{c['method']}` plan keeping {c['budget']} of routed experts "
        f"(experts per layer {','.join(map(str, res['plan']['experts_per_layer']))}); {mode}, float32, counters on; "
        f"{c['reps']} interleaved engine starts per variant and part, {c['rounds']} timed rounds each.",
        "",
        "| | full | pruned | pruned / full |",
        "|---|---:|---:|---:|",
        f"| routed-expert bytes resident | {f0['expert_bytes_resident']:,} | {p0['expert_bytes_resident']:,} | "
        f"{p0['expert_bytes_resident'] / f0['expert_bytes_resident']:.4f} |",
        f"| checkpoint bytes read at load | {f0['bytes_read']:,} | {p0['bytes_read']:,} | "
        f"{p0['bytes_read'] / f0['bytes_read']:.4f} |",
        f"| checkpoint read path alone (ms, median of {rd['repeats']}) | {rd['full_ms']['median']:.1f} | "
        f"{rd['pruned_ms']['median']:.1f} | {rd['pruned_ms']['median'] / rd['full_ms']['median']:.2f} |",
        "| engine start-up (s), each start | " + ", ".join(f"{e['startup_s']:.1f}" for e in f_a) + " | "
        + ", ".join(f"{e['startup_s']:.1f}" for e in p_a) + " | |",
    ]
    tf, tp = spread(_tok_s(a, "full")), spread(_tok_s(a, "pruned"))
    ratios = _ratios(a)
    lines.append(f"| output tok/s, ample KV cache (median, min..max) | {tf['median']:.0f} ({tf['min']:.0f}..{tf['max']:.0f}) | "
                 f"{tp['median']:.0f} ({tp['min']:.0f}..{tp['max']:.0f}) | {statistics.mean(ratios):.3f} "
                 f"({min(ratios):.3f}..{max(ratios):.3f}) |")
    chk = res["checks"]
    lines += [
        "",
        f"Exactness: pruned resident bytes = plan's kept bytes ({res['plan']['routed_expert_bytes_kept']:,}): "
        f"**{'yes' if chk['resident_equals_plan'] else 'NO'}**; = full x kept share "
        f"({res['plan']['kept_share']:.4f}): **{'yes' if chk['resident_equals_share'] else 'NO'}**; "
        f"bytes read = full read - pruned expert bytes: **{'yes' if chk['read_equals_full_minus_pruned'] else 'NO'}**.",
        "",
        "### Under the same memory budget",
        "",
        f"Definition: total memory = weight bytes + KV-cache bytes, the same for both. The full model's KV cache is "
        f"{c['kv_fraction']:.0%} of its weight bytes ({m['budget']['weight_bytes_full']:,} B of weights, "
        f"{m['budget']['kv_bytes_full']:,} B of KV cache, {m['budget']['total_bytes']:,} B in all); the pruned "
        f"variant holds {m['budget']['saved_bytes']:,} fewer weight bytes (the routed experts it does not keep) and "
        f"gets them as KV cache ({m['budget']['kv_bytes_pruned']:,} B). Engines are given exactly these KV sizes "
        f"(`kv_cache_memory_bytes`); KV cache costs {m['budget']['kv_bytes_per_token']:,} B per token "
        f"(float32 K and V, {res['model_shape']}). Workload: {c['mem_requests']} requests of up to "
        f"{m['budget']['request_tokens']} tokens (prompt + {c['max_tokens']} generated), "
        f"KV blocks of {m['budget']['block_size']} tokens. Engines allocated exactly the blocks these byte budgets "
        f"allow: **{'yes' if chk['kv_blocks_as_requested'] else 'NO'}**.",
        "",
        "| | full | pruned | pruned / full |",
        "|---|---:|---:|---:|",
    ]
    fm = [e for e in m["engines"] if e["variant"] == "full"]
    pm = [e for e in m["engines"] if e["variant"] == "pruned"]
    lines.append(f"| KV-cache tokens allocated | {fm[0]['kv_tokens']:,} | {pm[0]['kv_tokens']:,} | "
                 f"{pm[0]['kv_tokens'] / fm[0]['kv_tokens']:.2f} |")
    lines.append(f"| requests of the workload's length that fit at once | {m['fit']['full']} | {m['fit']['pruned']} | "
                 f"{m['fit']['pruned'] / max(m['fit']['full'], 1):.2f} |")
    mf, mp = spread(_tok_s(m["engines"], "full")), spread(_tok_s(m["engines"], "pruned"))
    mr = _ratios(m["engines"])
    lines.append(f"| output tok/s at equal memory (median, min..max) | {mf['median']:.0f} ({mf['min']:.0f}..{mf['max']:.0f}) | "
                 f"{mp['median']:.0f} ({mp['min']:.0f}..{mp['max']:.0f}) | {statistics.mean(mr):.3f} "
                 f"({min(mr):.3f}..{max(mr):.3f}) |")
    lines += [
        "",
        f"The KV gain is 1 + saved expert bytes / the full model's KV bytes: here "
        f"{m['budget']['kv_bytes_pruned'] / m['budget']['kv_bytes_full']:.2f}x the full model's KV bytes at "
        f"--kv-fraction {c['kv_fraction']} (block rounding gives the token ratio above); with a KV cache as large "
        f"as the weights it would be {1 + m['budget']['saved_bytes'] / m['budget']['weight_bytes_full']:.2f}x. "
        "Throughput at equal memory depends on the load: it gains only while the KV cache, not compute, limits "
        "the batch.",
        "",
        f"Run {res['date']}, {res['elapsed_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm_moe_prune.commands.plan import make_plan

    began = time.perf_counter()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.workdir or Path("runs") / f"serving-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(args.model)
    traffic = traffic_ids(args.model, DOMAINS, None)
    per_domain = -(-args.prompts // len(DOMAINS))
    prompts = [traffic[d][i] for i in range(per_domain) for d in DOMAINS][: args.prompts]

    ample: list[dict[str, Any]] = []
    plan_path: Path | None = None
    plan = None
    for rep in range(args.reps):
        order = ["full", "pruned"] if rep % 2 == 0 else ["pruned", "full"]
        for variant in order:
            print(f"[ample KV, rep {rep + 1}/{args.reps}] {variant}", flush=True)
            if variant == "full":
                trace = (traffic, work / "traces") if plan_path is None else None
                result = run_engine(args, None, prompts, trace=trace)
                if plan_path is None:
                    plan = make_plan(args.model, args.method, args.budget, traces=[str(work / "traces")])
                    plan_path = work / f"plan-{args.method}.yaml"
                    plan.save(plan_path)
            else:
                result = run_engine(args, plan_path, prompts)
            result["rep"] = rep
            ample.append(result)
            print(f"    start {result['startup_s']} s, output tok/s "
                  + ", ".join(f"{r['output_tok_s']:.0f}" for r in result["rounds"]), flush=True)
    assert plan is not None and plan_path is not None

    # equal memory: weights + KV constant
    full_res = next(e for e in ample if e["variant"] == "full")
    pruned_res = next(e for e in ample if e["variant"] == "pruned")
    per_token = kv_bytes_per_token(args.model)
    weight_full = plan.predicted["weight_bytes_full"]
    saved = full_res["expert_bytes_resident"] - pruned_res["expert_bytes_resident"]
    kv_full = int(args.kv_fraction * weight_full)
    budget = {
        "weight_bytes_full": weight_full, "weight_bytes_pruned": plan.predicted["weight_bytes"],
        "saved_bytes": saved, "kv_bytes_full": kv_full, "kv_bytes_pruned": kv_full + saved,
        "total_bytes": weight_full + kv_full, "kv_bytes_per_token": per_token,
        "block_size": full_res["block_size"],
    }
    mem_prompts = [prompts[i % len(prompts)] for i in range(args.mem_requests)]
    request_tokens = max(len(p) for p in mem_prompts) + args.max_tokens
    budget["request_tokens"] = request_tokens
    mem_engines = []
    mem_args = argparse.Namespace(**{**vars(args), "prompts": args.mem_requests})
    for rep in range(args.reps):
        order = ["full", "pruned"] if rep % 2 == 1 else ["pruned", "full"]
        for variant in order:
            print(f"[equal memory, rep {rep + 1}/{args.reps}] {variant}", flush=True)
            kv = budget["kv_bytes_full"] if variant == "full" else budget["kv_bytes_pruned"]
            result = run_engine(mem_args, None if variant == "full" else plan_path, mem_prompts, kv_bytes=kv)
            result["rep"] = rep
            mem_engines.append(result)
            print(f"    KV tokens {result['kv_tokens']}, output tok/s "
                  + ", ".join(f"{r['output_tok_s']:.0f}" for r in result["rounds"]), flush=True)
    blocks_per_request = math.ceil(request_tokens / budget["block_size"])
    expected_blocks = {"full": budget["kv_bytes_full"] // (per_token * budget["block_size"]),
                       "pruned": budget["kv_bytes_pruned"] // (per_token * budget["block_size"])}
    fit = {v: next(e for e in mem_engines if e["variant"] == v)["kv_blocks"] // blocks_per_request
           for v in ("full", "pruned")}

    # the loader's read path alone, interleaved
    full_ms, pruned_ms = [], []
    for _ in range(7):
        full_ms.append(timed_checkpoint_read(args.model, None)[0] * 1e3)
        pruned_ms.append(timed_checkpoint_read(args.model, plan.kept)[0] * 1e3)

    kept_share = sum(len(v) for v in plan.kept.values()) / (ckpt.shape.num_experts * len(ckpt.shape.moe_layers))
    checks = {
        "resident_equals_plan": all(e["expert_bytes_resident"] == plan.predicted["routed_expert_bytes_kept"]
                                    for e in ample + mem_engines if e["variant"] == "pruned"),
        "resident_equals_share": pruned_res["expert_bytes_resident"] == round(full_res["expert_bytes_resident"] * kept_share),
        "read_equals_full_minus_pruned": pruned_res["bytes_read"]
        == full_res["bytes_read"] - plan.predicted["routed_expert_bytes_pruned"],
        "kv_blocks_as_requested": all(e["kv_blocks"] == expected_blocks[e["variant"]] for e in mem_engines),
    }
    cfg = json.loads((args.model / "config.json").read_text())
    res = {
        "benchmark": "serving",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("output", "no_write", "workdir")},
        "model_shape": f"{cfg['num_hidden_layers']} layers x {cfg['num_key_value_heads']} KV heads x head_dim "
                       f"{cfg.get('head_dim')}",
        "plan": {"plan_id": plan.plan_id, "experts_per_layer": list(plan.experts_per_layer.values()),
                 "kept_share": kept_share, **plan.predicted},
        "checks": checks,
        "checkpoint_read": {"repeats": len(full_ms), "full_ms": spread(full_ms), "pruned_ms": spread(pruned_ms)},
        "ample": ample,
        "equal_memory": {"budget": budget, "fit": fit, "blocks_per_request": blocks_per_request, "engines": mem_engines},
        "environment": environment(),
        "workdir": str(work),
    }
    res["elapsed_s"] = round(time.perf_counter() - began, 1)
    table = markdown(res)
    print()
    print(table)
    if not args.no_write:
        write_results("serving", res, table, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
