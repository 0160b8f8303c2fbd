"""Expert Activation Norm baselines: keep the experts whose routed outputs are largest.

EAN scores expert ``e`` by ``sum over X_e of ||f_e(x)||`` (tokens routed to it under
the original routing); MAN by the mean over ``X_e``, which ignores how often the expert
is used. They need the experts' outputs, so calibration signals. Uniform. Ties (experts
never routed to score 0) are broken by router probability mass, then lower expert id.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_moe_prune.budget import Budget, Constraints
from vllm_moe_prune.methods.common import Kept, keep_uniform, need_calibration, stack_layers
from vllm_moe_prune.signals import CalibrationSignals, routed_gates
from vllm_moe_prune.stats import RoutingStats


def routed_norm_scores(signals: CalibrationSignals, weighted: bool, mean: bool) -> tuple[np.ndarray, np.ndarray]:
    """``([L, E] score, [L, E] router probability mass)`` of the output-norm family.

    Score: sum (or, with ``mean``, mean) over each expert's routed tokens of ``||f_e(x)||``,
    multiplied by the token's gate weight renormalised over the top-k when ``weighted``
    (REAP's definition, whatever the model's own renormalisation). EAN, MAN and REAP
    differ only in these two switches.
    """
    scores, mass = [], []
    for _, layer in signals.layers():
        gates, routed = routed_gates(layer, signals.top_k, renormalise=True)
        norms = layer.expert_out.norm(dim=-1).double()  # [T, E]
        contribution = norms * (gates.double() if weighted else routed.double())
        total = contribution.sum(dim=0)
        if mean:
            total = total / routed.sum(dim=0).clamp(min=1)
        scores.append(total.numpy())
        mass.append(torch.softmax(layer.router_logits, dim=-1).double().sum(dim=0).numpy())
    return stack_layers(scores), stack_layers(mass)


def routed_norm_plan(
    method: str,
    signals: CalibrationSignals | None,
    budget: Budget,
    constraints: Constraints,
    *,
    weighted: bool,
    mean: bool,
) -> Kept:
    signals = need_calibration(signals, method, constraints)
    keys = routed_norm_scores(signals, weighted=weighted, mean=mean)
    return keep_uniform(keys, budget, constraints, signals.moe_layers, signals.num_experts)


def ean(
    stats: RoutingStats | None, signals: CalibrationSignals | None, budget: Budget, constraints: Constraints
) -> Kept:
    """Keep the experts with the largest summed output norm over their routed tokens."""
    return routed_norm_plan("ean", signals, budget, constraints, weighted=False, mean=False)


def man(
    stats: RoutingStats | None, signals: CalibrationSignals | None, budget: Budget, constraints: Constraints
) -> Kept:
    """Keep the experts with the largest mean output norm over their routed tokens."""
    return routed_norm_plan("man", signals, budget, constraints, weighted=False, mean=True)
