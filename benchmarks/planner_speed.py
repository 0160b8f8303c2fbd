"""How long every planning method takes on statistics shaped like DeepSeek-V3.

Planning runs on the operator's machine, often on CPU, after traces are merged; a method
that takes an hour per plan cannot follow live traffic. This benchmark builds synthetic
routing statistics and calibration signals of a large model's shape (default: 58 MoE
layers x 256 experts, top-8, 8 routing groups) and times every registered method at
each requested sparsity, on one CPU thread by default.

The data are synthetic: routing skew and expert outputs are random with fixed seeds. The
times measure the planners, not plan quality. Calibration signals are kept in memory
(``layers x tokens x experts x hidden x 4`` bytes; about 1 GB at the defaults).

    python benchmarks/planner_speed.py                       # full shape, writes results
    python benchmarks/planner_speed.py --layers 4 --methods frequency,reap
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.budget import Budget, Constraints, resolve_budget
from vllm_moe_prune.methods import METHODS
from vllm_moe_prune.signals import CalibrationSignals, LayerSignals, moe_output
from vllm_moe_prune.stats import RoutingStats

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58, help="MoE layers (DeepSeek-V3: 58)")
    parser.add_argument("--experts", type=int, default=256, help="routed experts per layer (DeepSeek-V3: 256)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (DeepSeek-V3: 8)")
    parser.add_argument("--groups", type=int, default=8, help="routing groups (DeepSeek-V3: 8)")
    parser.add_argument("--tokens", type=int, default=256, help="calibration tokens per layer")
    parser.add_argument("--sequences", type=int, default=8, help="calibration sequences the tokens split into")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the synthetic signals")
    parser.add_argument("--trace-tokens", type=int, default=4096, help="tokens behind the routing statistics")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5], help="shares of experts pruned")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to time")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for planner_speed.json/.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def synthetic_layer(args: argparse.Namespace, generator: torch.Generator) -> LayerSignals:
    """One layer of calibration signals with skewed routing and expert-specific output scales."""
    tokens, experts, hidden = args.tokens, args.experts, args.hidden
    x = torch.randn(tokens, hidden, generator=generator)
    router = torch.randn(experts, hidden, generator=generator) / hidden**0.5
    bias = torch.randn(experts, generator=generator)  # some experts are popular
    logits = 2.0 * x @ router.T + bias
    scale = torch.rand(experts, 1, generator=generator) + 0.5
    expert_out = torch.randn(tokens, experts, hidden, generator=generator) * scale + 0.3 * x[:, None, :]
    layer_out = moe_output(logits, expert_out, range(experts), args.top_k, True)
    seq_index = torch.arange(tokens) * args.sequences // tokens
    return LayerSignals(logits, expert_out, layer_out, x, seq_index)


def synthetic_stats(args: argparse.Namespace, moe_layers: list[int], generator: torch.Generator) -> RoutingStats:
    """Routing statistics of ``trace_tokens`` tokens routed top-k by skewed random logits."""
    stats = RoutingStats.zeros(moe_layers, args.experts, args.top_k)
    stats.tokens = args.trace_tokens
    previous = None
    for i in range(len(moe_layers)):
        logits = torch.randn(args.trace_tokens, args.experts, generator=generator) + 2.0 * torch.randn(
            args.experts, generator=generator
        )
        probs = torch.softmax(logits, dim=-1)
        gates, chosen = probs.topk(args.top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        stats.counts[i] = torch.bincount(chosen.flatten(), minlength=args.experts)
        stats.prob_sum[i] = probs.double().sum(dim=0)
        stats.gate_sum[i] = torch.zeros(args.experts, dtype=torch.float64).index_add_(
            0, chosen.flatten(), gates.flatten().double()
        )
        if previous is not None:
            pairs = (previous[:, :, None] * args.experts + chosen[:, None, :]).flatten()
            stats.transitions[i - 1] = torch.bincount(pairs, minlength=args.experts**2).view(args.experts, args.experts)
        previous = chosen
    stats.validate()
    return stats


def budget_for(
    args: argparse.Namespace, sparsity: float, constraints: Constraints, moe_layers: list[int], uniform: bool
) -> Budget:
    """The budget keeping ``1 - sparsity`` of the (equally sized) experts."""
    sizes = [[1] * args.experts for _ in moe_layers]
    return resolve_budget(f"{1.0 - sparsity:.6f}", sizes, constraints, moe_layers, uniform=uniform)


def markdown(rows: list[dict], config: dict) -> str:
    sparsities = sorted({row["sparsity"] for row in rows})
    lines = [
        f"Planner speed: {config['layers']} MoE layers x {config['experts']} experts, top-{config['top_k']}, "
        f"{config['groups']} groups; {config['tokens']} calibration tokens ({config['sequences']} sequences, "
        f"hidden {config['hidden']}); {config['threads']} CPU thread(s).",
        "",
        "| method | " + " | ".join(f"{s:.0%} pruned (s)" for s in sparsities) + " |",
        "|---|" + "---:|" * len(sparsities),
    ]
    for method in dict.fromkeys(row["method"] for row in rows):
        cells = {row["sparsity"]: row["seconds"] for row in rows if row["method"] == method}
        lines.append(f"| {method} | " + " | ".join(f"{cells[s]:.2f}" for s in sparsities) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"unknown methods {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    moe_layers = list(range(3, 3 + args.layers))  # DeepSeek-V3: three dense layers first
    start = time.perf_counter()
    layers = [synthetic_layer(args, generator) for _ in moe_layers]
    signals = CalibrationSignals.from_layers(layers, moe_layers, args.top_k, True, args.groups)
    stats = synthetic_stats(args, moe_layers, generator)
    print(
        f"synthetic data: {time.perf_counter() - start:.1f}s, "
        f"{sum(layer.expert_out.numel() for layer in layers) * 4 / 2**30:.2f} GiB of expert outputs"
    )
    constraints = Constraints(args.top_k, args.groups)

    rows = []
    for method in methods:
        spec = METHODS[method]
        for sparsity in args.sparsity:
            budget = budget_for(args, sparsity, constraints, moe_layers, spec.uniform)
            start = time.perf_counter()
            kept = spec.fn(stats, signals, budget, constraints)
            seconds = time.perf_counter() - start
            counts = [len(ids) for ids in kept.values()]
            rows.append(
                {
                    "method": method,
                    "sparsity": sparsity,
                    "seconds": round(seconds, 3),
                    "kept_total": sum(counts),
                    "kept_per_layer_min": min(counts),
                    "kept_per_layer_max": max(counts),
                }
            )
            print(
                f"{method:12s} {sparsity:.0%} pruned: {seconds:7.2f}s  kept {sum(counts)} "
                f"({min(counts)}-{max(counts)} per layer)",
                flush=True,
            )

    config = {k: v for k, v in vars(args).items() if k not in ("output", "no_write", "methods")}
    table = markdown(rows, config)
    print()
    print(table)
    if not args.no_write:
        environment = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        }
        result = {"benchmark": "planner_speed", "config": config, "environment": environment, "results": rows}
        write_text_atomic(args.output / "planner_speed.json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(args.output / "planner_speed.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
