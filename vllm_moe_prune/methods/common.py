"""What every planning method shares: input checks and turning expert priorities into kept sets.

A method's own job is to say which experts matter most, as one or more priority keys per
expert (higher keeps first; later keys break ties of earlier ones). Turning priorities
into a plan that can be served is the same for every method and lives here once:
pinned layers kept whole, pinned experts kept first, at least ``top_k`` per layer,
grouped routing balanced, the budget never exceeded, and a deterministic tie-break
(lower layer, then lower expert id) so the same inputs always give the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vllm_moe_prune.budget import Budget, BudgetError, ConstraintError, Constraints
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.signals import CalibrationSignals
from vllm_moe_prune.stats import RoutingStats

#: Priority keys of every expert: a sequence of ``[L, E]`` arrays, most significant first.
Keys = Sequence[np.ndarray]

Kept = dict[int, list[int]]


def _check_routing(constraints: Constraints, top_k: int, num_groups: int, source: str) -> None:
    """Refuse constraints weaker than the model's routing: a plan could starve the router."""
    if constraints.top_k < top_k or constraints.num_groups != num_groups:
        raise ConstraintError(
            f"constraints (top_k={constraints.top_k}, {constraints.num_groups} groups) do not match the {source} "
            f"(top_k={top_k}, {num_groups} groups)"
        )


def need_routing(stats: RoutingStats | None, method: str, constraints: Constraints) -> RoutingStats:
    """The routing statistics a method needs, validated, or a refusal naming the producing command."""
    if stats is None:
        raise UserError(
            f"method '{method}' needs routing statistics (expert counts and gates of traced traffic); "
            "produce them with `vllm-moe-prune trace`"
        )
    stats.validate()
    _check_routing(constraints, stats.top_k, constraints.num_groups, "routing statistics")
    return stats


def need_calibration(signals: CalibrationSignals | None, method: str, constraints: Constraints) -> CalibrationSignals:
    """The calibration signals a method needs, or a refusal naming the producing command."""
    if signals is None:
        raise UserError(
            f"method '{method}' needs calibration signals (every expert's output on a calibration sample); "
            "produce them with `vllm-moe-prune calibrate`"
        )
    _check_routing(constraints, signals.top_k, signals.num_groups, "calibration signals")
    return signals


def _check_keys(keys: Keys, num_layers: int, num_experts: int) -> list[np.ndarray]:
    arrays = [np.asarray(k, dtype=np.float64) for k in keys]
    for k in arrays:
        if k.shape != (num_layers, num_experts):
            raise ValueError(f"priority keys must be [{num_layers}, {num_experts}], got {list(k.shape)}")
        if np.isnan(k).any():
            raise ValueError("priority keys contain NaN")
    return arrays


def _pinned_mask(constraints: Constraints, moe_layers: Sequence[int], num_experts: int) -> np.ndarray:
    mask = np.zeros((len(moe_layers), num_experts), dtype=bool)
    for i, layer in enumerate(moe_layers):
        mask[i, list(constraints.pinned_in(layer))] = True
    return mask


def group_rows(order: np.ndarray, num_experts: int, num_groups: int) -> np.ndarray:
    """``[E / G, G]``: row ``j`` holds the ``j``-th best expert of every group, in ``order``'s terms.

    Keeping the first ``n`` rows keeps ``n`` experts of every group, so grouped routing
    stays balanced; with one group the rows are just ``order``.
    """
    size = num_experts // num_groups
    rank = np.empty(num_experts, dtype=np.int64)
    rank[order] = np.arange(num_experts)
    members = np.arange(num_experts).reshape(num_groups, size)
    by_rank = np.take_along_axis(members, np.argsort(rank[members], axis=1, kind="stable"), axis=1)
    return by_rank.T


def _layer_rows(keys: list[np.ndarray], pinned: np.ndarray, i: int, num_groups: int) -> np.ndarray:
    """Group rows of layer ``i``: pinned first, then keys descending, then lower expert id."""
    num_experts = keys[0].shape[1]
    order = np.lexsort([np.arange(num_experts)] + [-k[i] for k in reversed(keys)] + [~pinned[i]])
    return group_rows(order, num_experts, num_groups)


def uniform_counts(
    budget: Budget, constraints: Constraints, moe_layers: Sequence[int], num_experts: int
) -> dict[int, int]:
    """Experts each layer keeps under a uniform method: all in pinned layers, ``per_layer`` elsewhere."""
    constraints.validate(moe_layers, num_experts)
    if budget.per_layer is None:
        raise BudgetError(f"budget '{budget.spec}' fits no uniform number of experts per layer for this method")
    counts = {}
    for layer in moe_layers:
        low = constraints.min_experts(layer, num_experts)
        if layer in constraints.pinned_layers:
            counts[layer] = num_experts
        elif not low <= budget.per_layer <= num_experts or budget.per_layer % constraints.num_groups:
            raise BudgetError(
                f"layer {layer}: keeping {budget.per_layer} experts violates its constraints "
                f"(at least {low}, at most {num_experts}, a multiple of {constraints.num_groups} groups)"
            )
        else:
            counts[layer] = budget.per_layer
    return counts


def keep_uniform(
    keys: Keys, budget: Budget, constraints: Constraints, moe_layers: Sequence[int], num_experts: int
) -> Kept:
    """The ``per_layer`` highest-priority experts of every layer (pinned first, groups balanced)."""
    arrays = _check_keys(keys, len(moe_layers), num_experts)
    pinned = _pinned_mask(constraints, moe_layers, num_experts)
    counts = uniform_counts(budget, constraints, moe_layers, num_experts)
    kept = {}
    for i, layer in enumerate(moe_layers):
        rows = _layer_rows(arrays, pinned, i, constraints.num_groups)
        kept[layer] = sorted(int(e) for e in rows[: counts[layer] // constraints.num_groups].ravel())
    return kept


def keep_global(
    keys: Keys,
    budget: Budget,
    constraints: Constraints,
    moe_layers: Sequence[int],
    num_experts: int,
    eligible: np.ndarray | None = None,
) -> Kept:
    """One global budget over all layers: each layer's floor, then the best experts anywhere.

    Every layer first keeps its minimum (:meth:`Constraints.min_experts`, its
    highest-priority experts); the rest of ``budget.total`` goes to the highest-priority
    experts of any layer. ``eligible[L, E]`` (default all) excludes experts from that
    second stage only: a layer's floor may still need them. With grouped routing the unit
    of choice is a row of one expert per group (:func:`group_rows`), ranked by its
    members' mean global rank, so every layer stays balanced.
    """
    num_layers = len(moe_layers)
    arrays = _check_keys(keys, num_layers, num_experts)
    constraints.validate(moe_layers, num_experts)
    pinned = _pinned_mask(constraints, moe_layers, num_experts)
    eligible = np.ones((num_layers, num_experts), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    groups = constraints.num_groups

    layer_ids, expert_ids = np.indices((num_layers, num_experts))
    order = np.lexsort([expert_ids.ravel(), layer_ids.ravel()] + [-k.ravel() for k in reversed(arrays)])
    position = np.empty(num_layers * num_experts, dtype=np.float64)
    position[order] = np.arange(num_layers * num_experts)
    position = position.reshape(num_layers, num_experts)

    kept: Kept = {}
    floor_total = 0
    candidates: list[tuple[float, int, int]] = []  # (mean global rank, layer index, row)
    rows_of = {}
    for i, layer in enumerate(moe_layers):
        rows = rows_of[i] = _layer_rows(arrays, pinned, i, groups)
        floor_rows = constraints.min_experts(layer, num_experts) // groups
        kept[layer] = [int(e) for e in rows[:floor_rows].ravel()]
        floor_total += floor_rows * groups
        for j in range(floor_rows, rows.shape[0]):
            if eligible[i, rows[j]].all():
                candidates.append((float(position[i, rows[j]].mean()), i, j))
    if budget.total < floor_total:
        raise BudgetError(
            f"budget '{budget.spec}' keeps {budget.total} experts, fewer than the {floor_total} every layer's "
            "minimum needs (top_k, pinned experts and layers)"
        )
    candidates.sort()
    for _, i, j in candidates[: (budget.total - floor_total) // groups]:
        kept[moe_layers[i]].extend(int(e) for e in rows_of[i][j])
    return {layer: sorted(ids) for layer, ids in kept.items()}


def stack_layers(rows: Sequence[np.ndarray]) -> np.ndarray:
    """``[L, E]`` float64 array from per-layer ``[E]`` rows (methods score one layer at a time)."""
    return np.stack([np.asarray(r, dtype=np.float64) for r in rows])
