"""REAP (Router-weighted Expert Activation Pruning, arXiv 2510.13999).

``S_e = mean over X_e of g_e(x) * ||f_e(x)||`` with ``g`` renormalised over the top-k:
an expert matters when the router trusts it AND its output is large. Same number removed
in every layer (uniform). Shares its scoring with EAN (:func:`routed_norm_scores`).
"""

from __future__ import annotations

from vllm_moe_prune.budget import Budget, Constraints
from vllm_moe_prune.methods.common import Kept
from vllm_moe_prune.methods.ean import routed_norm_plan
from vllm_moe_prune.signals import CalibrationSignals
from vllm_moe_prune.stats import RoutingStats


def reap(
    stats: RoutingStats | None, signals: CalibrationSignals | None, budget: Budget, constraints: Constraints
) -> Kept:
    """Keep the experts with the largest mean gate-weighted output norm over their routed tokens."""
    return routed_norm_plan("reap", signals, budget, constraints, weighted=True, mean=True)
