"""``vllm-moe-prune demo``: the whole loop on the built-in testbed, with figures.

traffic -> traces (vLLM, capture on) -> calibration -> plans under one budget ->
each variant served by vLLM from the original checkpoint -> memory, bytes read,
held-out perplexity per domain and live coverage, side by side with the full model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.quality import perplexity, ratio_summary
from vllm_moe_prune.testbed import TESTBED_MODEL
from vllm_moe_prune.testbed.corpus import DOMAINS

HELP = """\
Run the whole loop on the built-in testbed model (a small Qwen3-MoE trained on four
text domains) and print what each pruned variant costs and keeps:

  1. replay each domain's traffic through vLLM with routing capture -> trace shards
  2. a small calibration pass (expert outputs, for methods that need them)
  3. plans under one budget with several methods
  4. serve each variant from the ORIGINAL checkpoint (only kept experts are read)
  5. held-out perplexity per domain, weight memory, bytes read, traffic coverage

Everything is written under --workdir (traces, calibration, plans, results.json/md).
"""

DEFAULT_METHODS = ("frequency", "reap", "pathfinder", "mosaic")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="the whole loop on the built-in testbed, with figures", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=str(TESTBED_MODEL), help="model directory (default: the built-in testbed)")
    parser.add_argument("--workdir", help="output directory (default: runs/demo-<time>)")
    parser.add_argument("--budget", default="50%", help="budget for every plan (default: keep 50%% of routed experts)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods to compare")
    parser.add_argument("--prompts-per-domain", type=int, default=24, help="traffic prompts replayed per domain")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (slower start-up on 2 cores)")
    parser.set_defaults(run=run)


def _load_jsonl(path: Path, key: str, limit: int | None = None) -> list[str]:
    lines = path.read_text().splitlines()[:limit]
    return [json.loads(line)[key] for line in lines]


def _serve_and_measure(model: Path, plan_path: Path | None, traffic: dict[str, list[list[int]]],
                       heldout: dict[str, list[list[int]]], trace_dir: Path | None, eager: bool) -> dict[str, Any]:
    """One engine: replay traffic with capture (writing shards if asked), then score held-out text."""
    from vllm_moe_prune.plan import Plan
    from vllm_moe_prune_plugins.offline import TracingLLM, prompt_logprobs, trace_labelled

    ckpt = Checkpoint.open(model)
    plan = Plan.load(plan_path) if plan_path else None
    started = time.perf_counter()
    with TracingLLM(model, plan_path, dtype="float32", max_model_len=512, enforce_eager=eager, seed=0) as engine:
        startup = time.perf_counter() - started
        traced = trace_labelled(engine, traffic, 16, trace_dir, ckpt.fingerprint)
        kept = plan.kept if plan else ckpt.experts
        coverage = {domain: float(stats.kept_mass(kept).mean()) for domain, stats in traced.items()}
        tokens = sum(stats.tokens for stats in traced.values())
        ppl = {domain: perplexity(prompt_logprobs(engine.llm, seqs)) for domain, seqs in heldout.items()}
        status = engine.status()
    return {
        "plan_id": status["load_info"]["plan_id"], "startup_s": round(startup, 1),
        "bytes_read": status["load_info"]["bytes_read"],
        "expert_bytes_resident": status["expert_bytes_resident"], "traced_tokens": tokens,
        "coverage": coverage, "perplexity": ppl,
        "experts_per_layer": list(plan.experts_per_layer.values()) if plan else None,
    }


def _markdown(rows: list[dict[str, Any]], budget: str, full_bytes: int) -> str:
    head = "| variant | experts per layer | expert MiB resident | MiB read at load | " + " | ".join(
        f"ppl {d}" for d in DOMAINS) + " | ppl ratio (geo-mean) | traffic coverage |"
    lines = [f"Testbed, budget {budget} of routed experts. Perplexity on held-out text of each domain "
             "(vLLM prompt logprobs); coverage: share of live router probability on kept experts.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        counts = "all" if row["experts_per_layer"] is None else ",".join(map(str, row["experts_per_layer"]))
        lines.append(
            f"| {row['name']} | {counts} | {row['expert_bytes_resident'] / 2**20:.2f} | {row['bytes_read'] / 2**20:.2f} | "
            + " | ".join(f"{row['perplexity'][d]:.2f}" for d in DOMAINS)
            + f" | {row['summary']['geomean_ratio']:.3f} | {sum(row['coverage'].values()) / len(row['coverage']):.3f} |"
        )
    lines.append(f"\nCheckpoint: {full_bytes / 2**20:.2f} MiB of weights.")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import os

    # vLLM reads its log level at import: keep the demo's own progress readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if args.verbose else "WARNING")
    from transformers import AutoTokenizer

    from vllm_moe_prune.calibration import run_calibration
    from vllm_moe_prune.commands.plan import make_plan

    model = Path(args.model)
    ckpt = Checkpoint.open(model)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.workdir or f"runs/demo-{stamp}")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = model / "data"
    traffic = {d: [tokenizer(t).input_ids for t in _load_jsonl(data / d / "traffic.jsonl", "prompt", args.prompts_per_domain)]
               for d in DOMAINS}
    heldout = {d: [tokenizer(t).input_ids[:256] for t in _load_jsonl(data / d / "heldout.jsonl", "text")] for d in DOMAINS}
    eager = not args.compile

    print(f"[1/4] full model: replaying {sum(map(len, traffic.values()))} prompts of {len(DOMAINS)} domains with capture")
    full = _serve_and_measure(model, None, traffic, heldout, work / "traces", eager)
    full.update(name="full")

    print("[2/4] calibration pass (expert outputs on a sample of the traffic)")
    prompts_file = work / "calibration-prompts.jsonl"
    write_text_atomic(prompts_file, "".join(
        json.dumps({"prompt": t}) + "\n" for d in DOMAINS for t in _load_jsonl(data / d / "traffic.jsonl", "prompt", 8)))
    run_calibration(model, prompts_file, work / "calibration", max_tokens=1024)

    rows = [full]
    print(f"[3/4] plans at budget {args.budget}: {', '.join(args.methods)}")
    plans = {}
    for method in args.methods:
        plan = make_plan(model, method, args.budget, traces=[str(work / "traces")], calibration=str(work / "calibration"))
        plans[method] = work / f"plan-{method}.yaml"
        plan.save(plans[method])
    print("[4/4] serving each variant from the original checkpoint")
    for method, path in plans.items():
        row = _serve_and_measure(model, path, traffic, heldout, None, eager)
        row.update(name=method)
        rows.append(row)
    for row in rows:
        row["summary"] = ratio_summary(row["perplexity"], full["perplexity"])
    table = _markdown(rows, args.budget, ckpt.total_bytes)
    write_text_atomic(work / "results.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(work / "results.md", table)
    print()
    print(table)
    print(f"Everything is in {work}/ (traces/, calibration/, plan-*.yaml, results.json, results.md).")
    return 0
