"""``vllm-moe-prune inspect``: what a plan keeps, what it weighs, what traffic it covers.

Before serving a variant, an operator wants three numbers per MoE layer: how many
experts survive, how many bytes they are, and how much of the real routing lands on
them. Without a plan, the same command summarises traces (tokens, hot experts, routing
entropy), which is how one decides whether pruning a layer is promising at all.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
from pathlib import Path

import torch

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.plan import Plan, PlanError, predicted_bytes
from vllm_moe_prune.stats import RoutingStats
from vllm_moe_prune.traces import TraceSet, load_traces

#: The plan's predicted byte totals this command reports (written by ``Plan.for_checkpoint``).
_BYTE_KEYS = {"weight_bytes_full", "weight_bytes", "routed_expert_bytes_kept", "routed_expert_bytes_pruned"}

DESCRIPTION = """\
Show what a pruning plan keeps and how much of the traced traffic it covers,
or summarise traces on their own.

  inspect PLAN.yaml                  per MoE layer: experts kept / total, their bytes
  inspect PLAN.yaml --traces DIR     ... plus the share of traced routing on kept experts
  inspect PLAN.yaml --model DIR      ... bytes read from the checkpoint (exact per layer)
  inspect --traces DIR               traces alone: tokens, hot experts, routing entropy

Coverage columns (with --traces):
  prob kept    share of the router's probability mass on the kept experts: what the
               pruned router can still reach
  routed kept  share of the traced top-k routings that went to kept experts: how often
               a token's choice survives pruning unchanged

Without --model, per-layer bytes are kept experts x the mean expert size from the
plan's predicted bytes (exact when all experts have one size, as in supported families).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="what a plan keeps, its bytes, the share of traced routing it covers",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("plan", nargs="?", type=Path, metavar="PLAN", help="plan.yaml written by `plan`")
    parser.add_argument(
        "--traces",
        action="append",
        type=Path,
        metavar="PATH",
        help="trace directory or shard file (repeat for several); must be traces of the plan's model",
    )
    parser.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="checkpoint directory: exact per-layer bytes; the plan and traces must be of this model",
    )
    parser.add_argument("--label", help="only traces with this traffic label (the label given when tracing)")
    parser.add_argument("--top", type=int, default=4, metavar="N", help="hot experts listed per layer (default 4)")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave out unreadable or foreign trace shards (listed) instead of refusing all",
    )
    parser.set_defaults(run=run)
    return parser


def _table(header: list[str], rows: list[list[str]], text_last: bool = False) -> str:
    """Right-aligned columns; with ``text_last`` the last column is free text, left-aligned."""
    aligned = len(header) - 1 if text_last else len(header)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(aligned)]
    return "\n".join(
        "  ".join([cell.rjust(width) for cell, width in zip(row, widths)] + row[aligned:]).rstrip()
        for row in [header, *rows]
    )


def _describe_traces(traces: TraceSet) -> str:
    def shares(tokens_by: dict[str, int]) -> str:
        return " ".join(f"{key}={tokens:,}" for key, tokens in tokens_by.items())

    def when(t: float) -> str:
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    count = len(traces.shards)
    lines = [
        f"traces {traces.trace_id}: {count} shard{'s' if count != 1 else ''}, {traces.tokens:,} tokens, "
        f"{when(traces.start)} to {when(traces.end)}",
        f"  labels: {shares(traces.labels)}; variants: {shares(traces.variants)}",
    ]
    lines += [f"  skipped {reason}" for _, reason in traces.skipped]
    return "\n".join(lines)


def _load(args: argparse.Namespace, fingerprint: str | None) -> TraceSet:
    return load_traces(args.traces, fingerprint=fingerprint, label=args.label, skip_invalid=args.skip_invalid)


def _layer_bytes(plan: Plan, ckpt: Checkpoint | None) -> tuple[list[int] | None, dict[str, int], str]:
    """Kept bytes per MoE layer, whole-model byte totals, and where they came from."""
    layers = sorted(plan.kept)
    if ckpt is not None:
        per_layer = [sum(ckpt.expert_bytes[i][e] for e in plan.kept[layer]) for i, layer in enumerate(layers)]
        return per_layer, predicted_bytes(ckpt, plan.kept), f"bytes from the checkpoint {ckpt.path}"
    predicted = plan.predicted
    if not _BYTE_KEYS <= set(predicted):
        return None, {}, "bytes unknown: the plan has no predicted bytes (pass --model DIR)"
    routed = predicted["routed_expert_bytes_kept"] + predicted["routed_expert_bytes_pruned"]
    expert = routed / (len(layers) * plan.num_experts)
    per_layer = [round(len(plan.kept[layer]) * expert) for layer in layers]
    return per_layer, predicted, "bytes from the plan's prediction (per layer: kept experts x mean expert size)"


def _coverage(values: torch.Tensor, stats: RoutingStats, kept: dict[int, list[int]]) -> list[str]:
    """Per layer, then over all layers: the share of ``values[L, E]`` on kept experts.

    A layer without any mass (e.g. traces imported without probabilities) shows ``-``
    rather than a vacuous 100%.
    """
    kept_sums = [float(values[i, kept[layer]].sum()) for i, layer in enumerate(stats.moe_layers)]
    totals = [float(values[i].sum()) for i in range(stats.num_layers)]
    pairs = [*zip(kept_sums, totals), (sum(kept_sums), sum(totals))]
    return [f"{k / t:.2%}" if t > 0 else "-" for k, t in pairs]


def _inspect_plan(args: argparse.Namespace) -> str:
    plan = Plan.load(args.plan)
    ckpt = None
    if args.model is not None:
        ckpt = Checkpoint.open(args.model)
        plan.validate_for(ckpt)
    layers = sorted(plan.kept)
    per_layer, totals, source = _layer_bytes(plan, ckpt)
    out = [
        f"plan {plan.plan_id}: method {plan.method}, model {plan.model_type} {plan.fingerprint}, "
        f"{plan.num_experts} experts, top-{plan.top_k}",
        source,
    ]
    header = ["layer", "kept", "kept bytes"]
    columns: list[list[str]] = [
        [str(layer) for layer in layers] + ["all"],
        [f"{len(plan.kept[layer])}/{plan.num_experts}" for layer in layers]
        + [f"{sum(map(len, plan.kept.values()))}/{plan.num_experts * len(layers)}"],
        ([f"{b:,}" for b in per_layer] + [f"{sum(per_layer):,}"]) if per_layer else ["-"] * (len(layers) + 1),
    ]
    if args.traces:
        traces = _load(args, plan.fingerprint)
        stats = traces.stats
        if list(stats.moe_layers) != layers:
            raise PlanError(f"plan layers {layers} differ from the traced MoE layers {list(stats.moe_layers)}")
        out.append(_describe_traces(traces))
        header += ["prob kept", "routed kept"]
        columns += [_coverage(stats.prob_sum, stats, plan.kept), _coverage(stats.counts, stats, plan.kept)]
    out += ["", _table(header, [list(row) for row in zip(*columns)])]
    if totals:
        full, weight = totals["weight_bytes_full"], totals["weight_bytes"]
        out += [
            "",
            f"weights: {weight:,} of {full:,} bytes ({weight / full:.2%}); "
            f"routed experts: {totals['routed_expert_bytes_kept']:,} kept, "
            f"{totals['routed_expert_bytes_pruned']:,} pruned",
        ]
    return "\n".join(out)


def _entropy_bits(share: torch.Tensor) -> float:
    """Entropy of one layer's routing distribution; ``2**bits`` experts would be as spread."""
    share = share[share > 0]
    return float(-(share * share.log2()).sum())


def _inspect_traces(args: argparse.Namespace) -> str:
    fingerprint = Checkpoint.open(args.model).fingerprint if args.model is not None else None
    traces = _load(args, fingerprint)
    stats = traces.stats
    out = [
        _describe_traces(traces),
        f"model {traces.fingerprint}: {stats.num_layers} MoE layers x {stats.num_experts} experts, top-{stats.top_k}",
        "",
    ]
    max_bits = math.log2(stats.num_experts)
    shares = stats.routing_share()
    rows = []
    for i, layer in enumerate(stats.moe_layers):
        counts, share = stats.counts[i], shares[i]
        bits = _entropy_bits(share)
        top = share.argsort(descending=True, stable=True)[: args.top].tolist()
        rows.append([
            str(layer),
            f"{int(counts.sum()):,}",
            f"{bits:.2f}/{max_bits:.2f}",
            f"{2**bits:.1f}",
            str(int((counts == 0).sum())),
            " ".join(f"{e}:{float(share[e]):.1%}" for e in top),
        ])  # fmt: skip
    out.append(_table(["layer", "routed", "entropy bits", "effective experts", "unused", "top experts"], rows, True))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if args.plan is None and not args.traces:
        raise UserError("nothing to inspect: give a PLAN file, --traces PATH, or both (see --help)")
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    print(_inspect_plan(args) if args.plan is not None else _inspect_traces(args))
    return 0
