"""``vllm-moe-prune export``: a standalone pruned Hugging Face checkpoint from a plan."""

from __future__ import annotations

import argparse

from vllm_moe_prune.export import export_pruned
from vllm_moe_prune.plan import Plan

HELP = """\
Write the plan's variant as a new checkpoint directory (written atomically; the plan is
embedded as moe_prune_plan.yaml). Only kept experts are read from the original.

  vllm-moe-prune export --model DIR --plan plan.yaml --out DIR-pruned

A uniform plan (same count in every MoE layer) gives an ordinary checkpoint that stock
vLLM and transformers load. A non-uniform plan records its per-layer counts in
config.json ("moe_prune") and is served through this plugin: serve the ORIGINAL
checkpoint with the plan instead (`vllm-moe-prune serve-args`).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="write a standalone pruned checkpoint", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="original checkpoint directory")
    parser.add_argument("--plan", required=True, help="plan.yaml made for that checkpoint")
    parser.add_argument("--out", required=True, help="new directory to create")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    out = export_pruned(args.model, plan, args.out)
    kind = "uniform: loads in stock vLLM and transformers" if plan.is_uniform else "non-uniform: loads through the plugin"
    print(f"exported plan {plan.plan_id} to {out} ({kind})")
    return 0
