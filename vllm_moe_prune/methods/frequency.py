"""Routing-count baselines: keep the experts the traffic used most.

They need only routing statistics, which live traffic gives for free, so they are the
methods a production fleet can re-run continuously. Both are uniform: the same number
of experts is removed from every layer. Ties (notably experts never routed to) are broken
by the total router probability an expert received, then by lower expert id.
"""

from __future__ import annotations

from vllm_moe_prune.budget import Budget, Constraints
from vllm_moe_prune.methods.common import Kept, keep_uniform, need_routing
from vllm_moe_prune.signals import CalibrationSignals
from vllm_moe_prune.stats import RoutingStats


def frequency(
    stats: RoutingStats | None, signals: CalibrationSignals | None, budget: Budget, constraints: Constraints
) -> Kept:
    """Keep the experts with the most routed tokens ``|X_e|`` in every layer."""
    stats = need_routing(stats, "frequency", constraints)
    keys = [stats.counts.double().numpy(), stats.prob_sum.numpy()]
    return keep_uniform(keys, budget, constraints, stats.moe_layers, stats.num_experts)


def soft_count(
    stats: RoutingStats | None, signals: CalibrationSignals | None, budget: Budget, constraints: Constraints
) -> Kept:
    """Keep the experts with the largest summed gate weight over their routed tokens."""
    stats = need_routing(stats, "soft-count", constraints)
    keys = [stats.gate_sum.numpy(), stats.prob_sum.numpy()]
    return keep_uniform(keys, budget, constraints, stats.moe_layers, stats.num_experts)
