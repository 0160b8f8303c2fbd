"""NAEE enumeration (Lu et al. 2024, arXiv 2402.14800): the subset that best reconstructs each layer.

Per layer, keep the ``r`` experts ``C`` minimising ``||Y - F(X; C)||`` over the
calibration tokens, where ``F(X; C)`` is the layer pruned to ``C``
(:func:`~vllm_moe_prune.signals.moe_output`: dropped router logits removed before
top-k). The loss is the squared Frobenius norm over all calibration tokens, which has
the same minimiser as the norm itself. Exhaustive search when the number of candidate
subsets is small (``C(E, r)`` up to ``max_subsets``), else greedy one-at-a-time removal
of the expert whose removal hurts least. Uniform. Mosaic Pruning reuses
:func:`best_subset` for its general experts.

Greedy removal on a 256-expert layer evaluates every remaining expert at every step;
doing that through :func:`moe_output` would recompute every token for every candidate.
:class:`RemovalScorer` evaluates the same routing rule incrementally instead: removing
``j`` only changes the tokens that had ``j`` in their top-k (its replacement is their
``(k+1)``-th expert) and, without renormalisation, rescales the others' gates by
``1 / (1 - q_j)``. Tests check it against :func:`moe_output` to float precision.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from vllm_moe_prune.budget import Budget, Constraints
from vllm_moe_prune.methods.common import Kept, keep_uniform, need_calibration, stack_layers, uniform_counts
from vllm_moe_prune.signals import CalibrationSignals, LayerSignals, reconstruction_error
from vllm_moe_prune.stats import RoutingStats

logger = logging.getLogger(__name__)

#: Largest number of candidate subsets searched exhaustively per layer.
MAX_SUBSETS = 20000

#: Elements per chunk when precomputing ``y . f_e`` in float64 over ``[T, E, H]``.
_TOKEN_CHUNK = 1 << 22


def _group_choices(size: int, num_experts: int, pinned: Sequence[int], num_groups: int) -> list[tuple[list[int], int]]:
    """Per group: its unpinned experts, and how many of them a balanced subset of ``size`` holding ``pinned`` adds."""
    group = num_experts // num_groups
    choices = []
    for g in range(num_groups):
        free = [e for e in range(g * group, (g + 1) * group) if e not in pinned]
        choices.append((free, size // num_groups - (group - len(free))))
    return choices


def count_subsets(size: int, num_experts: int, pinned: Sequence[int] = (), num_groups: int = 1) -> int:
    """Subsets of ``size`` experts holding ``pinned`` with every group equally filled."""
    return math.prod(math.comb(len(free), need) for free, need in _group_choices(size, num_experts, pinned, num_groups))


def exhaustive(
    layer: LayerSignals, size: int, top_k: int, renormalise: bool, pinned: Sequence[int] = (), num_groups: int = 1
) -> list[int]:
    """The subset of ``size`` experts (holding ``pinned``, groups balanced) with the least loss.

    Candidates are enumerated in lexicographic order and the first minimum wins, so
    ties resolve deterministically.
    """
    per_group = [
        itertools.combinations(free, need) for free, need in _group_choices(size, layer.num_experts, pinned, num_groups)
    ]
    subsets = [sorted([*pinned, *itertools.chain(*parts)]) for parts in itertools.product(*per_group)]
    losses = reconstruction_error(layer, torch.tensor(subsets, dtype=torch.int64), top_k, renormalise).sum(dim=1)
    return subsets[int(torch.argmin(losses))]


class RemovalScorer:
    """Scores every one-expert removal from a kept set of one layer (see the module docstring).

    Built once per layer: it holds the float64 logits, each token's experts sorted by
    logit and each token's ``y_t . f_e(x_t)``. A step then finds every token's
    top-(k+1) kept experts in a short prefix of its sorted list and works on
    ``[T, k+1, k+1]`` Gram matrices of their outputs, never on ``[T, E, H]``; only
    without renormalisation does it need ``[T, E]`` passes (every gate rescales).
    """

    def __init__(self, layer: LayerSignals, top_k: int, renormalise: bool):
        self.top_k = top_k
        self.renormalise = renormalise
        self.logits = layer.router_logits.double()
        self.order = torch.argsort(layer.router_logits, dim=-1, descending=True, stable=True)
        self.width = min(layer.num_experts, 4 * (top_k + 1))  # sorted prefix searched for the top-(k+1)
        target = layer.layer_out.double()
        self.sq_target = target.square().sum(dim=-1)  # [T]
        step = max(1, _TOKEN_CHUNK // max(1, layer.num_experts * layer.hidden_size))
        self.cross = torch.cat(
            [
                torch.einsum("teh,th->te", layer.expert_out[i : i + step].double(), target[i : i + step])
                for i in range(0, layer.tokens, step)
            ]
        )  # [T, E]: y_t . f_e(x_t)
        self.flat_out = layer.expert_out.reshape(-1, layer.hidden_size)
        self.row_base = torch.arange(layer.tokens)[:, None] * layer.num_experts

    def _top(self, keep: torch.Tensor, count: int) -> torch.Tensor:
        """``[T, count]`` ids of each token's ``count`` highest-logit kept experts, best first."""
        num_experts = self.order.shape[1]
        while True:
            window = self.order[:, : self.width]
            kept = keep[window]
            if self.width == num_experts or int(kept.sum(dim=-1).min()) >= count:
                break
            self.width = min(num_experts, 2 * self.width)
        first = kept & (kept.cumsum(dim=-1) <= count)
        return window.gather(1, first.nonzero()[:, 1].view(-1, count))

    @staticmethod
    @functools.cache
    def _rows(k: int, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate rows over a token's top-``k1`` slots: row 0 the current top-k, row ``1 + i`` without slot ``i``.

        Returns ``(excluded [1 + k, k1] mask, best remaining slot [1 + k])``.
        """
        excluded = torch.cat([(torch.arange(k1) >= k)[None, :], torch.eye(k1, dtype=torch.bool)[:k]])
        best = torch.zeros(1 + k, dtype=torch.int64)
        best[1] = 1
        return excluded, best

    def losses(self, keep: torch.Tensor) -> torch.Tensor:
        """``[E]`` squared loss after removing each kept expert (``inf`` if not kept); >= 2 kept."""
        tokens, num_experts = self.logits.shape
        kept = int(keep.sum())
        k = min(self.top_k, kept)  # size of each token's current top set
        k1 = min(self.top_k + 1, kept)  # ... plus the expert that replaces a removed one
        top_i = self._top(keep, k1)  # [T, k1]
        inside = top_i[:, :k]
        top_logits = self.logits.gather(1, top_i)
        outs = self.flat_out.index_select(0, (self.row_base + top_i).reshape(-1)).view(tokens, k1, -1).double()
        # [T, k1, k1 + 1]: Gram matrix of the slots' outputs, then their products with y_t.
        products = torch.cat([outs @ outs.transpose(1, 2), self.cross.gather(1, top_i)[:, :, None]], dim=2)
        excluded, best = self._rows(k, k1)
        row_logits = top_logits[:, None, :].masked_fill(excluded, -math.inf)  # [T, 1 + k, k1]

        if self.renormalise:
            gates = (row_logits - top_logits[:, best, None]).exp()
            gates = gates / gates.sum(dim=-1, keepdim=True)
        else:
            # Raw restricted-softmax gates: each row's partition function is the current
            # one without the removed slot's expert. For the top-1 expert 1 - q can vanish,
            # so that one is summed directly where q > 1/2.
            masked = self.logits.masked_fill(~keep, -math.inf)
            lse = masked.logsumexp(dim=-1)  # [T]
            top_q = (top_logits[:, :k] - lse[:, None]).exp()
            row_lse = torch.cat([lse[:, None], lse[:, None] + torch.log1p(-top_q.clamp(max=0.5))], dim=1)
            dominant = torch.nonzero(top_q[:, 0] > 0.5).flatten()
            row_lse[dominant, 1] = masked[dominant].scatter(1, top_i[dominant, :1], -math.inf).logsumexp(dim=-1)
            gates = (row_logits - row_lse[:, :, None]).exp()

        mixed = torch.bmm(gates, products)  # [T, 1 + k, k1 + 1]
        linear = mixed[:, :, -1]  # y_t . output of each row
        quadratic = (mixed[:, :, :-1] * gates).sum(dim=-1)  # ||output of each row||^2
        errors = self.sq_target[:, None] - 2.0 * linear + quadratic  # [T, 1 + k]

        if self.renormalise:
            # Removing j outside a token's top set changes nothing for that token.
            losses = errors[:, 0].sum().expand(num_experts).clone()
            change = errors[:, 1:] - errors[:, :1]
        else:
            # ... except that its gates grow by 1/(1-q_j), well conditioned as q_j <= 1/(k+1).
            scale = 1.0 / (1.0 - (masked - lse[:, None]).exp().scatter(1, inside, 0.0))
            outside = self.sq_target[:, None] - 2.0 * scale * linear[:, :1] + scale.square() * quadratic[:, :1]
            losses = outside.scatter(1, inside, 0.0).sum(dim=0)
            change = errors[:, 1:]
        losses.index_add_(0, inside.reshape(-1), change.reshape(-1))
        return losses.masked_fill(~keep, math.inf)


def greedy_removal(
    layer: LayerSignals, size: int, top_k: int, renormalise: bool, pinned: Sequence[int] = (), num_groups: int = 1
) -> list[int]:
    """Remove, one at a time, the expert whose removal raises the loss least, down to ``size``.

    Pinned experts are never removed; with grouped routing only groups still above their
    share (``size / num_groups``) give up experts. Ties go to the lower expert id.
    """
    num_experts = layer.num_experts
    keep = torch.ones(num_experts, dtype=torch.bool)
    removable = torch.ones(num_experts, dtype=torch.bool)
    removable[list(pinned)] = False
    group_of = torch.arange(num_experts) // (num_experts // num_groups)
    share = size // num_groups
    scorer = RemovalScorer(layer, top_k, renormalise)
    while int(keep.sum()) > size:
        losses = scorer.losses(keep)
        per_group = torch.zeros(num_groups, dtype=torch.int64).index_add_(0, group_of, keep.long())
        losses[~(removable & (per_group[group_of] > share))] = math.inf
        keep[int(torch.nonzero(losses == losses.min())[0])] = False
    return torch.nonzero(keep).flatten().tolist()


def best_subset(
    layer: LayerSignals,
    size: int,
    top_k: int,
    renormalise: bool,
    pinned: Sequence[int] = (),
    num_groups: int = 1,
    max_subsets: int = MAX_SUBSETS,
) -> list[int]:
    """The ``size`` experts (holding ``pinned``, groups balanced) that best reconstruct the layer.

    Exhaustive when at most ``max_subsets`` subsets qualify, else :func:`greedy_removal`.
    """
    pinned = sorted(set(pinned))
    if size >= layer.num_experts:
        return list(range(layer.num_experts))
    if size % num_groups or len(pinned) > size:
        raise ValueError(f"cannot keep {size} experts holding {len(pinned)} pinned in {num_groups} groups")
    candidates = count_subsets(size, layer.num_experts, pinned, num_groups)
    if candidates <= max_subsets:
        logger.debug("exhaustive search over %d subsets of %d experts", candidates, size)
        return exhaustive(layer, size, top_k, renormalise, pinned, num_groups)
    logger.debug("%d subsets of %d experts: greedy removal", candidates, size)
    return greedy_removal(layer, size, top_k, renormalise, pinned, num_groups)


def enumeration(
    stats: RoutingStats | None,
    signals: CalibrationSignals | None,
    budget: Budget,
    constraints: Constraints,
    max_subsets: int = MAX_SUBSETS,
) -> Kept:
    """NAEE: per layer, the ``per_layer`` experts whose pruned layer best reconstructs the original."""
    signals = need_calibration(signals, "enumeration", constraints)
    counts = uniform_counts(budget, constraints, signals.moe_layers, signals.num_experts)
    rows = []
    for layer, sig in signals.layers():
        chosen = best_subset(
            sig,
            counts[layer],
            signals.top_k,
            signals.renormalise,
            constraints.pinned_in(layer),
            constraints.num_groups,
            max_subsets,
        )
        row = np.zeros(signals.num_experts)
        row[chosen] = 1.0
        rows.append(row)
    return keep_uniform([stack_layers(rows)], budget, constraints, signals.moe_layers, signals.num_experts)
