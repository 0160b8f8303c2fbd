"""Planning methods: pure functions from statistics to the experts each MoE layer keeps.

Every method has the signature::

    fn(stats: RoutingStats | None, signals: CalibrationSignals | None,
       budget: Budget, constraints: Constraints, **params) -> dict[int, list[int]]

returning, per ORIGINAL MoE layer index (``moe_layers`` values), the kept original expert
ids in ascending order. The registry says which input each method needs, so the CLI can
ask for (and name the command that produces) exactly that, and whether the method keeps
the same number in every layer, so the budget is resolved the right way
(:func:`vllm_moe_prune.budget.resolve_budget`'s ``uniform``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_moe_prune.errors import UserError
from vllm_moe_prune.methods.common import Kept
from vllm_moe_prune.methods.ean import ean, man
from vllm_moe_prune.methods.enumeration import enumeration
from vllm_moe_prune.methods.frequency import frequency, soft_count
from vllm_moe_prune.methods.mosaic import mosaic
from vllm_moe_prune.methods.pathfinder import pathfinder
from vllm_moe_prune.methods.reap import reap

ROUTING = "routing"  # RoutingStats, from `vllm-moe-prune trace`
CALIBRATION = "calibration"  # CalibrationSignals, from `vllm-moe-prune calibrate`


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, the inputs it needs, and how it spends a budget."""

    name: str
    fn: Callable[..., Kept]
    needs: frozenset[str]
    uniform: bool
    summary: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("frequency", frequency, frozenset({ROUTING}), True, "most routed tokens per expert"),
        MethodSpec("soft-count", soft_count, frozenset({ROUTING}), True, "largest summed gate weight"),
        MethodSpec("ean", ean, frozenset({CALIBRATION}), True, "largest summed output norm over routed tokens"),
        MethodSpec("man", man, frozenset({CALIBRATION}), True, "largest mean output norm over routed tokens"),
        MethodSpec("reap", reap, frozenset({CALIBRATION}), True, "largest mean gate-weighted output norm (REAP)"),
        MethodSpec(
            "enumeration",
            enumeration,
            frozenset({CALIBRATION}),
            True,
            "subset that best reconstructs each layer (NAEE)",
        ),
        MethodSpec(
            "pathfinder", pathfinder, frozenset({CALIBRATION}), False, "experts on the best paths, one global budget"
        ),
        MethodSpec("mosaic", mosaic, frozenset({CALIBRATION}), True, "general experts plus one per functional cluster"),
    )
}


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``, or a refusal listing the choices."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
