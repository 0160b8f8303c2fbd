"""Mosaic Pruning (MoP, arXiv 2511.19822): a few general experts plus one per functional cluster.

Keeps ``r`` experts in every layer (uniform), chosen to cover distinct functions so the
pruned model generalises beyond its calibration corpus:

1. general experts: the ``m`` experts whose pruned layer best reconstructs the original
   (:func:`~vllm_moe_prune.methods.enumeration.best_subset`: exhaustive or greedy);
2. domains: k-means on the layer's input hidden states into ``K = r - m`` token clusters;
3. performance profile ``v[i, k]``: mean over cluster ``k`` of ``||F(x_t; only i) - y_t||^2``;
4. distance between experts ``1 - (1 + rho) / 2``, ``rho`` the Spearman rank correlation
   of their profiles;
5. Ward clustering of the non-general experts into ``r - m`` clusters;
6. from each cluster the expert with the highest Activation Variability Score
   ``S_var(i) = sum_t q_t log2(q_t N)``, ``q_t`` its share of its routing mass over the
   ``N`` tokens: KL(its routing over tokens || uniform), high for a specialist.

Choices the definition leaves open, made here:

* ``m`` defaults to ``max(1, r // 4)`` (pinned experts count as general; more pins than
  ``m`` make ``m`` the pin count).
* Degenerate profiles: with fewer than 3 token clusters Spearman correlation is
  undefined (one cluster) or only +-1 (two), so profiles always use ``max(K, 3)``
  k-means clusters (the expert tree is still cut into ``K``); empty clusters are dropped,
  and if fewer than 3 remain (fewer than 3 distinct tokens) clustering is skipped and the
  ``K`` highest-AVS experts are kept. Experts with constant profiles correlate 0 with
  every other. When no more experts remain than clusters, all are kept.
* Grouped routing: the final set is taken in priority order (general, cluster
  representatives by AVS, the rest by AVS) under the per-group quota, so a representative
  whose group is full gives way to the next best expert of another group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from scipy.stats import rankdata

from vllm_moe_prune.budget import Budget, Constraints
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.methods.common import Kept, keep_uniform, need_calibration, stack_layers, uniform_counts
from vllm_moe_prune.methods.enumeration import MAX_SUBSETS, best_subset
from vllm_moe_prune.signals import CalibrationSignals, LayerSignals, reconstruction_error
from vllm_moe_prune.stats import RoutingStats

logger = logging.getLogger(__name__)

#: Fewest profile dimensions for which a rank correlation says more than the sign.
_MIN_PROFILE = 3

_GENERAL, _REPRESENTATIVE, _OTHER = 2.0, 1.0, 0.0


def activation_variability(router_logits: torch.Tensor) -> torch.Tensor:
    """``[E]`` Activation Variability Score: KL(each expert's routing mass over tokens || uniform), bits."""
    probs = torch.softmax(router_logits.double(), dim=-1)
    share = probs / probs.sum(dim=0, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.special.xlogy(share, share * probs.shape[0]).sum(dim=0) / np.log(2.0)


def kmeans(points: torch.Tensor, clusters: int, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """``[T]`` cluster labels: k-means++ seeding then Lloyd iterations, deterministic for a seed."""
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(points.shape[0], (1,), generator=generator)]
    nearest = (points - centres[0]).square().sum(dim=1)  # squared distance to the closest centre
    for _ in range(1, clusters):
        if float(nearest.sum()) == 0.0:  # fewer distinct points than clusters
            break
        chosen = points[torch.multinomial(nearest, 1, generator=generator)]
        centres = torch.cat([centres, chosen])
        nearest = torch.minimum(nearest, (points - chosen).square().sum(dim=1))
    labels = torch.cdist(points, centres).argmin(dim=1)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        sizes = torch.bincount(labels, minlength=centres.shape[0])
        occupied = sizes > 0
        centres[occupied] = sums[occupied] / sizes[occupied, None]
        updated = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def spearman_distance(profiles: np.ndarray) -> np.ndarray:
    """``[n, n]`` distance ``1 - (1 + rho) / 2`` between rows, ``rho`` Spearman's rank correlation."""
    ranks = rankdata(profiles, axis=1)
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    unit = np.divide(centred, norms[:, None], out=np.zeros_like(centred), where=norms[:, None] > 0)
    rho = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(rho, 1.0)
    return (1.0 - rho) / 2.0


def representatives(
    layer: LayerSignals,
    candidates: Sequence[int],
    clusters: int,
    avs: torch.Tensor,
    top_k: int,
    renormalise: bool,
    seed: int,
) -> list[int]:
    """One expert per functional cluster of ``candidates`` (steps 2-6 of the module docstring)."""
    if len(candidates) <= clusters:
        return list(candidates)
    by_avs = sorted(candidates, key=lambda e: (-float(avs[e]), e))
    labels = kmeans(layer.hidden, max(clusters, _MIN_PROFILE), seed)
    sizes = torch.bincount(labels)
    occupied = torch.nonzero(sizes).flatten()
    if len(occupied) < _MIN_PROFILE:
        logger.debug("only %d distinct token clusters: keeping the %d highest-AVS experts", len(occupied), clusters)
        return by_avs[:clusters]
    errors = reconstruction_error(layer, torch.tensor(candidates)[:, None], top_k, renormalise)  # [n, T]
    profile = torch.zeros(len(candidates), len(sizes), dtype=torch.float64).index_add_(1, labels, errors)
    profile = (profile[:, occupied] / sizes[occupied]).numpy()
    distance = spearman_distance(profile)
    tree = linkage(squareform(distance, checks=False), method="ward")
    cluster_of = cut_tree(tree, n_clusters=clusters).ravel()
    rank = {e: i for i, e in enumerate(by_avs)}
    chosen = {}
    for expert, cluster in zip(candidates, cluster_of, strict=True):
        if cluster not in chosen or rank[expert] < rank[chosen[cluster]]:
            chosen[cluster] = expert
    return sorted(chosen.values())


def mosaic_layer(
    layer: LayerSignals,
    keep: int,
    top_k: int,
    renormalise: bool,
    general: int | None = None,
    pinned: Sequence[int] = (),
    seed: int = 0,
    max_subsets: int = MAX_SUBSETS,
) -> tuple[np.ndarray, np.ndarray]:
    """``([E] tier, [E] AVS)`` of one layer: tier 2 general, 1 cluster representative, 0 other."""
    num_experts = layer.num_experts
    avs = activation_variability(layer.router_logits)
    tier = np.full(num_experts, _OTHER)
    if keep >= num_experts:
        tier[:] = _GENERAL
        return tier, avs.numpy()
    size = min(keep, max(len(pinned), max(1, keep // 4) if general is None else general))
    core = best_subset(layer, size, top_k, renormalise, pinned, 1, max_subsets) if size > len(pinned) else list(pinned)
    tier[core] = _GENERAL
    if keep > len(core):
        rest = [e for e in range(num_experts) if e not in set(core)]
        tier[representatives(layer, rest, keep - len(core), avs, top_k, renormalise, seed)] = _REPRESENTATIVE
    return tier, avs.numpy()


def mosaic(
    stats: RoutingStats | None,
    signals: CalibrationSignals | None,
    budget: Budget,
    constraints: Constraints,
    general: int | None = None,
    seed: int = 0,
    max_subsets: int = MAX_SUBSETS,
) -> Kept:
    """Mosaic Pruning; see the module docstring.

    ``general``: general experts per layer (``m``; default ``max(1, r // 4)``).
    ``seed``: k-means seeding. ``max_subsets``: exhaustive search limit for the general set.
    """
    signals = need_calibration(signals, "mosaic", constraints)
    if general is not None and general < 0:
        raise UserError(f"mosaic: general must be >= 0, got {general}")
    counts = uniform_counts(budget, constraints, signals.moe_layers, signals.num_experts)
    tiers, scores = [], []
    for layer, sig in signals.layers():
        tier, avs = mosaic_layer(
            sig,
            counts[layer],
            signals.top_k,
            signals.renormalise,
            general,
            constraints.pinned_in(layer),
            seed,
            max_subsets,
        )
        tiers.append(tier)
        scores.append(avs)
    keys = [stack_layers(tiers), stack_layers(scores)]
    return keep_uniform(keys, budget, constraints, signals.moe_layers, signals.num_experts)
