"""MoE Pathfinder (trajectory pruning, arXiv 2512.18425): keep the experts on the best paths.

The model is a layered graph source -> router_1 -> expert(1, e) -> router_2 -> ... -> sink.
Per calibration sequence ``s``, MoE layer ``l`` and expert ``e``:

* ``p[s, l, e]``: mean full-softmax router probability over the sequence's tokens
  (weight of the edge router_l -> expert(l, e));
* ``a[s, l, e]``: mean output norm ``||f_e(x_t)||``, every expert run on every token
  (weight of the edge expert(l, e) -> router_(l+1));
* ``L[s, l, e] = ||Y_l - F_l(X_l; only e)||_F`` over the sequence's tokens, and node weight
  ``w = softmax_e(-L / tau)``.

A path's score is ``sum_l log p + log w + log a``; each sequence keeps its ``m`` best
paths (k-best dynamic programming) and ``freq(l, e)`` counts the kept paths through
each expert over all sequences. Tukey fences (3 x IQR) per sequence and layer force
outliers: very low ``L`` or very high ``a`` always kept, very high ``L`` or very low
``a`` always dropped, keep winning conflicts; as in the authors' release, a sequence's
outliers are taken out of its path search (a kept outlier needs no path through it).
One GLOBAL budget over all layers gives non-uniform counts: forced keeps first, then
experts by ``freq``. Unlike the release, every layer keeps at least ``top_k`` experts
(and its pinned experts), and a forced drop is never used to fill the budget. Ties in
``freq`` (with ``m = 1`` most experts have none) go to the higher mean node score
``log p + log w + log a`` over sequences, then to the lower layer and expert id.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vllm_moe_prune.budget import Budget, Constraints
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.methods.common import Kept, keep_global, need_calibration
from vllm_moe_prune.signals import CalibrationSignals, LayerSignals, reconstruction_error
from vllm_moe_prune.stats import RoutingStats

logger = logging.getLogger(__name__)

#: Added inside every log, as the authors' code does, so unused experts score finitely.
_LOG_EPS = 1e-10

#: Tukey fence multiplier and the fewest experts for which quartiles mean anything.
IQR_MULTIPLIER = 3.0
_MIN_VALUES = 4


def default_paths(sparsity: float) -> int:
    """The paper's settings: one path per sequence at 50% sparsity, 500 at 25%.

    Only those two points are published; at or above 50% we use 1, below it 500.
    """
    return 1 if sparsity >= 0.5 else 500


def sequence_scores(
    layer: LayerSignals, num_sequences: int, top_k: int, renormalise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, a, L)`` of one layer, each ``[S, E]`` float64 (rows of absent sequences are 0)."""
    seq = layer.seq_index
    tokens = torch.bincount(seq, minlength=num_sequences).double().clamp(min=1)[:, None]

    def per_sequence(values: torch.Tensor) -> torch.Tensor:  # [T, E] -> [S, E] sums
        return torch.zeros(num_sequences, values.shape[1], dtype=torch.float64).index_add_(0, seq, values.double())

    probs = torch.softmax(layer.router_logits.double(), dim=-1)
    norms = layer.expert_out.norm(dim=-1)
    single = torch.arange(layer.num_experts)[:, None]  # every expert alone
    errors = reconstruction_error(layer, single, top_k, renormalise)  # [E, T]
    return per_sequence(probs) / tokens, per_sequence(norms) / tokens, per_sequence(errors.T).sqrt()


def tukey_outliers(values: torch.Tensor, multiplier: float = IQR_MULTIPLIER) -> tuple[torch.Tensor, torch.Tensor]:
    """``(below, above)`` the Tukey fences of each row of ``values`` ``[S, E]``.

    Quartiles interpolate linearly; rows with fewer than four values or no spread have no
    outliers (the fences would flag noise).
    """
    quartiles = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype), dim=-1)  # [2, S]
    spread = quartiles[1] - quartiles[0]
    valid = (spread > 1e-12) & (values.shape[-1] >= _MIN_VALUES)
    below = values < (quartiles[0] - multiplier * spread)[:, None]
    above = values > (quartiles[1] + multiplier * spread)[:, None]
    return below & valid[:, None], above & valid[:, None]


def _best(values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``count`` largest values and their indices, descending, ties to the lower index.

    ``topk`` alone leaves the order of ties unspecified and a full stable sort of
    ``paths x E`` candidates per layer is two orders of magnitude slower.
    """
    count = min(count, values.shape[1])
    threshold = values.topk(count, dim=1).values[:, -1:]
    above = values > threshold
    tied = values == threshold
    chosen = above | (tied & (tied.cumsum(dim=1) <= count - above.sum(dim=1, keepdim=True)))
    index = chosen.nonzero()[:, 1].view(values.shape[0], count)  # ascending index
    order = torch.sort(values.gather(1, index), dim=1, descending=True, stable=True).indices
    index = index.gather(1, order)
    return values.gather(1, index), index


def k_best_path_counts(node_scores: torch.Tensor, paths: int) -> torch.Tensor:
    """``[L, E]``: how many of each sequence's ``paths`` best paths pass through each node.

    ``node_scores[S, L, E]`` is the (log) score of passing through expert ``e`` of layer
    ``l`` for sequence ``s``, ``-inf`` where the path may not go. Dynamic programming over
    layers keeps, per sequence, the ``paths`` best partial paths (ties: earlier parent, lower
    expert id), then walks back from the survivors. Paths of ``-inf`` score (fewer allowed
    paths than ``paths``) do not count.
    """
    num_sequences, num_layers, num_experts = node_scores.shape
    scores = node_scores[:, 0, :]
    parents: list[torch.Tensor] = []  # per layer: slot of each survivor's prefix in the previous layer
    experts: list[torch.Tensor] = []  # per layer: each survivor's expert
    for layer in range(num_layers):
        if layer > 0:
            scores = (scores[:, :, None] + node_scores[:, layer, None, :]).reshape(num_sequences, -1)
        scores, order = _best(scores, paths)
        parents.append(order // num_experts)
        experts.append(order % num_experts)
    alive = torch.isfinite(scores)
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    slot = torch.arange(scores.shape[1]).expand(num_sequences, -1)
    for layer in range(num_layers - 1, -1, -1):
        counts[layer].index_add_(
            0, experts[layer].gather(1, slot)[alive], torch.ones(int(alive.sum()), dtype=torch.int64)
        )
        slot = parents[layer].gather(1, slot)
    return counts


def pathfinder(
    stats: RoutingStats | None,
    signals: CalibrationSignals | None,
    budget: Budget,
    constraints: Constraints,
    paths: int | None = None,
    tau: float = 1.0,
) -> Kept:
    """MoE Pathfinder with one global budget and a per-layer floor; see the module docstring.

    ``paths``: best paths kept per sequence (``m``; default :func:`default_paths` of the
    budget's sparsity). ``tau``: temperature of the node weights.
    """
    signals = need_calibration(signals, "pathfinder", constraints)
    num_layers, num_experts, num_seq = signals.num_layers, signals.num_experts, signals.num_sequences
    if paths is None:
        paths = default_paths(1.0 - budget.total / (num_layers * num_experts))
    if paths < 1 or tau <= 0:
        raise UserError(f"pathfinder needs paths >= 1 and tau > 0, got paths={paths}, tau={tau}")

    node = torch.empty(num_seq, num_layers, num_experts, dtype=torch.float64)
    on_paths = torch.empty(num_seq, num_layers, num_experts, dtype=torch.bool)
    forced_keep = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    forced_drop = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    present = torch.zeros(num_seq, dtype=torch.bool)
    for i, (_, layer) in enumerate(signals.layers()):
        p, a, loss = sequence_scores(layer, num_seq, signals.top_k, signals.renormalise)
        present |= torch.bincount(layer.seq_index, minlength=num_seq) > 0
        node[:, i] = (p + _LOG_EPS).log() + torch.log_softmax(-loss / tau, dim=-1) + (a + _LOG_EPS).log()
        low_loss, high_loss = tukey_outliers(loss)
        low_norm, high_norm = tukey_outliers(a)
        keep, drop = low_loss | high_norm, high_loss | low_norm
        outlier = keep | drop
        # A sequence whose outliers cover the whole layer still needs a way through it.
        on_paths[:, i] = ~outlier | outlier.all(dim=-1, keepdim=True)
        forced_keep[i] = keep[present].any(dim=0)
        forced_drop[i] = (drop & ~keep)[present].any(dim=0)
    forced_drop &= ~forced_keep

    freq = k_best_path_counts(node[present].masked_fill(~on_paths[present], -torch.inf), paths)
    tier = forced_keep.double() - forced_drop.double()
    keys = [tier.numpy(), freq.double().numpy(), node[present].mean(dim=0).numpy()]
    kept = keep_global(keys, budget, constraints, signals.moe_layers, num_experts, eligible=~forced_drop.numpy())

    kept_mask = np.zeros((num_layers, num_experts), dtype=bool)
    for i, layer in enumerate(signals.moe_layers):
        kept_mask[i, kept[layer]] = True
    missed = int((forced_keep.numpy() & ~kept_mask).sum())
    if missed:
        logger.warning(
            "pathfinder: the budget leaves out %d of %d forced-keep outlier experts", missed, int(forced_keep.sum())
        )
    logger.info(
        "pathfinder: %d paths per sequence over %d sequences, %d forced keeps, %d forced drops",
        paths,
        int(present.sum()),
        int(forced_keep.sum()),
        int(forced_drop.sum()),
    )
    return kept
