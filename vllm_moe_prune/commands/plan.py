"""``vllm-moe-prune plan``: statistics + a memory budget -> a validated plan.yaml."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from vllm_moe_prune.budget import Constraints, budget_for_checkpoint
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.methods import CALIBRATION, METHODS, ROUTING, get_method
from vllm_moe_prune.plan import Plan

logger = logging.getLogger(__name__)

HELP = """\
Choose the experts to keep under a memory budget and write a plan file.

  vllm-moe-prune plan --model DIR --traces traces/ --method frequency --budget 50% --out plan.yaml
  vllm-moe-prune plan --model DIR --calibration calib/ --method mosaic --budget 6/layer --out plan.yaml
  vllm-moe-prune plan --model DIR --calibration calib/ --method pathfinder --budget 0.8GiB --out plan.yaml

--budget is one of: weight memory of the whole variant ("12GiB", "800MiB", "5e9B"),
the share of routed-expert parameters to KEEP ("50%", "0.5"), or experts kept per MoE
layer ("6/layer"). It is converted exactly with the checkpoint's per-expert byte sizes;
an impossible budget is refused with the smallest feasible one.

Methods and the statistics they need (routing: `vllm-moe-prune trace`;
calibration: `vllm-moe-prune calibrate`):
""" + "\n".join(
    f"  {name:<12} {spec.summary} [{', '.join(sorted(spec.needs))}]{'' if spec.uniform else ' (non-uniform)'}"
    for name, spec in METHODS.items()
)


def _pins(values: list[str]) -> dict[int, list[int]]:
    pins: dict[int, list[int]] = {}
    for value in values:
        try:
            layer, expert = (int(x) for x in value.split(":"))
        except ValueError:
            raise UserError(f"--pin {value!r}: expected LAYER:EXPERT, e.g. 3:17") from None
        pins.setdefault(layer, []).append(expert)
    return pins


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan", help="choose the experts to keep under a budget", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="original checkpoint directory")
    parser.add_argument("--method", required=True, choices=sorted(METHODS), metavar="METHOD", help="see the list above")
    parser.add_argument("--budget", required=True, help="memory, kept share or experts per layer (see above)")
    parser.add_argument("--out", required=True, help="plan file to write (YAML, written atomically)")
    parser.add_argument("--traces", action="append", default=[], help="trace directory or shard (repeatable)")
    parser.add_argument("--label", help="use only shards with this traffic label")
    parser.add_argument("--calibration", help="calibration directory from `vllm-moe-prune calibrate`")
    parser.add_argument("--pin", action="append", default=[], metavar="LAYER:EXPERT", help="always keep this expert")
    parser.add_argument("--pin-layer", action="append", type=int, default=[], metavar="LAYER",
                        help="keep every expert of this MoE layer")
    parser.set_defaults(run=run)


def make_plan(
    model: str | Path, method: str, budget: str, *, traces: list[str] | None = None, label: str | None = None,
    calibration: str | None = None, pins: dict[int, list[int]] | None = None, pin_layers: list[int] | None = None,
) -> Plan:
    """Everything ``plan`` does but writing: also what the demo and benchmarks call."""
    from vllm_moe_prune.calibration import load_calibration
    from vllm_moe_prune.traces import load_traces

    ckpt = Checkpoint.open(model)
    spec = get_method(method)
    constraints = Constraints.for_shape(ckpt.shape, pinned_experts=pins or {}, pinned_layers=pin_layers or ())
    stats = signals = None
    provenance: dict[str, Any] = {}
    if ROUTING in spec.needs:
        if not traces:
            raise UserError(f"method {method} needs routing traces: pass --traces (made by `vllm-moe-prune trace`)")
        trace_set = load_traces(traces, fingerprint=ckpt.fingerprint, label=label)
        stats = trace_set.stats
        provenance["traces"] = trace_set.provenance()
    if CALIBRATION in spec.needs:
        if not calibration:
            raise UserError(
                f"method {method} needs calibration signals (expert outputs): run `vllm-moe-prune calibrate` "
                "and pass --calibration"
            )
        signals = load_calibration(calibration, fingerprint=ckpt.fingerprint)
        provenance["calibration"] = str(Path(calibration).resolve())
    resolved = budget_for_checkpoint(budget, ckpt, constraints, uniform=spec.uniform)
    started = time.perf_counter()
    kept = spec.fn(stats, signals, resolved, constraints)
    logger.info("method %s planned in %.2f s", method, time.perf_counter() - started)
    return Plan.for_checkpoint(
        ckpt, kept, method, params={"budget": budget, "kept_experts": resolved.total}, provenance=provenance,
        pinned=constraints.pinned_experts or None,
    )


def run(args: argparse.Namespace) -> int:
    plan = make_plan(
        args.model, args.method, args.budget, traces=args.traces, label=args.label, calibration=args.calibration,
        pins=_pins(args.pin), pin_layers=args.pin_layer,
    )
    plan.save(args.out)
    predicted = plan.predicted
    print(
        f"plan {plan.plan_id} ({args.method}, budget {args.budget}) -> {args.out}: "
        f"experts per layer {list(plan.experts_per_layer.values())}, weights "
        f"{predicted['weight_bytes'] / 2**20:.1f} MiB of {predicted['weight_bytes_full'] / 2**20:.1f} MiB"
    )
    return 0
