"""Calibration signals: the plain-tensor contract between the calibration pass and the planner.

Routing statistics (:mod:`vllm_moe_prune.stats`) are cheap to collect from live traffic
but say nothing about what an expert *computes*. The reconstruction-based methods
(NAEE enumeration, MoE Pathfinder, Mosaic Pruning) and the output-norm baselines (EAN,
REAP) need, per MoE layer, the output of every expert on every token of a small
calibration sample. This module defines those tensors and, in :func:`moe_output`, the
one definition of what a pruned layer computes, so that every method scores a candidate
subset against the same function the served variant will run.

A model's signals can be larger than memory (DeepSeek-V3: 58 layers x 256 experts x
7168 hidden per token), so :class:`CalibrationSignals` hands out one layer at a time
through a loader callable; storage can keep each layer in its own file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from vllm_moe_prune.errors import UserError

logger = logging.getLogger(__name__)

#: Elements of the largest intermediate tensor batched subset evaluations may allocate
#: (float32: 4 bytes each), so that evaluating thousands of subsets stays in cache-sized
#: chunks instead of one huge allocation.
_CHUNK_ELEMENTS = 1 << 22


class SignalsError(UserError):
    """Calibration signals that are inconsistent, mis-shaped or not finite."""


@dataclass(frozen=True)
class LayerSignals:
    """What the calibration pass recorded for one MoE layer, over ``T`` calibration tokens.

    * ``router_logits[T, E]``: the router's logits (float32);
    * ``expert_out[T, E, H]``: the output of EVERY routed expert on every token, without
      gate weight (float32), so any subset's output can be recomposed;
    * ``layer_out[T, H]``: the original layer's routed output ``y_t = sum_{top-k} g f_e``
      (shared experts excluded: they are never pruned, so they cancel in every loss);
    * ``hidden[T, H]``: the layer's input ``x_t`` (Mosaic clusters tokens by it);
    * ``seq_index[T]``: which calibration sequence each token belongs to (int64, from 0),
      for methods that score sequences separately (Pathfinder).
    """

    router_logits: torch.Tensor
    expert_out: torch.Tensor
    layer_out: torch.Tensor
    hidden: torch.Tensor
    seq_index: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.router_logits.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.router_logits.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.layer_out.shape[1])

    def validate(self, where: str, num_experts: int, num_sequences: int) -> None:
        """Refuse signals a planner would silently mis-score: wrong shapes, dtypes, NaN."""
        tokens = self.tokens
        hidden = int(self.hidden.shape[-1]) if self.hidden.dim() == 2 else -1
        expected = {
            "router_logits": ((tokens, num_experts), torch.float32),
            "expert_out": ((tokens, num_experts, hidden), torch.float32),
            "layer_out": ((tokens, hidden), torch.float32),
            "hidden": ((tokens, hidden), torch.float32),
            "seq_index": ((tokens,), torch.int64),
        }
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise SignalsError(
                    f"{where}: {name} must be {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise SignalsError(f"{where}: {name} contains NaN or infinite values")
        if tokens == 0:
            raise SignalsError(f"{where}: no calibration tokens")
        low, high = int(self.seq_index.min()), int(self.seq_index.max())
        if low < 0 or high >= num_sequences:
            raise SignalsError(f"{where}: seq_index must lie in [0, {num_sequences}), got [{low}, {high}]")


@dataclass(frozen=True)
class CalibrationSignals:
    """Calibration signals of a whole model, loaded one MoE layer at a time.

    ``load_layer(i)`` returns the :class:`LayerSignals` of the ``i``-th MoE layer (decoder
    layer ``moe_layers[i]``); methods call :meth:`layer` once per layer and drop the
    result before the next, so peak memory is one layer's signals. ``top_k``,
    ``renormalise`` and ``num_groups`` describe the model's routing, which
    :func:`moe_output` needs to recompose any subset's output.
    """

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    renormalise: bool
    num_sequences: int
    load_layer: Callable[[int], LayerSignals]
    num_groups: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[LayerSignals],
        moe_layers: Sequence[int],
        top_k: int,
        renormalise: bool,
        num_groups: int = 1,
    ) -> "CalibrationSignals":
        """Signals held in memory (tests, benchmarks, small models)."""
        if len(layers) != len(moe_layers):
            raise SignalsError(f"{len(layers)} layers of signals for {len(moe_layers)} MoE layers")
        if not layers:
            raise SignalsError("calibration signals cover no MoE layer")
        held = tuple(layers)
        return cls(
            moe_layers=tuple(moe_layers),
            num_experts=held[0].num_experts,
            top_k=top_k,
            renormalise=renormalise,
            num_sequences=max(int(layer.seq_index.max()) + 1 for layer in held),
            load_layer=held.__getitem__,
            num_groups=num_groups,
        )

    def layer(self, i: int) -> LayerSignals:
        """Signals of the ``i``-th MoE layer, validated."""
        signals = self.load_layer(i)
        signals.validate(f"calibration signals of MoE layer {self.moe_layers[i]}", self.num_experts, self.num_sequences)
        return signals

    def layers(self) -> Iterator[tuple[int, LayerSignals]]:
        """``(decoder layer index, signals)`` for every MoE layer, one loaded at a time."""
        for i, layer in enumerate(self.moe_layers):
            yield layer, self.layer(i)


def as_subsets(subset: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Expert ids as an int64 tensor ``[s]`` or ``[B, s]`` (a batch of equal-size subsets)."""
    ids = torch.as_tensor(subset, dtype=torch.int64)
    if ids.dim() not in (1, 2) or ids.shape[-1] == 0:
        raise ValueError(f"a subset is a non-empty list of expert ids (or a [B, s] batch), got shape {list(ids.shape)}")
    return ids


def restricted_gates(
    router_logits: torch.Tensor, subset: Sequence[int] | torch.Tensor, top_k: int, renormalise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of a layer that keeps only ``subset``: ``(weights, expert ids)``, ``[..., T, k]``.

    The served variant slices the router to the kept rows, so its softmax runs over the
    kept experts' logits only; top-k is taken among them (``k = min(top_k, s)``) and the
    gate weights are renormalised over the top-k when the model renormalises, else they
    are the raw restricted-softmax probabilities. Returned ids are original expert ids.
    """
    ids = as_subsets(subset)
    logits = router_logits.T[ids].transpose(-1, -2)  # [..., T, s]
    # Top-k by logit, not by probability: the same order, but no ties among experts
    # whose probabilities underflow to zero.
    pos = logits.topk(min(top_k, ids.shape[-1]), dim=-1).indices
    weights = torch.softmax(logits, dim=-1).gather(-1, pos)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    chosen = torch.gather(ids.unsqueeze(-2).expand(*logits.shape), -1, pos)
    return weights, chosen


def moe_output(
    router_logits: torch.Tensor,
    expert_out: torch.Tensor,
    subset: Sequence[int] | torch.Tensor,
    top_k: int,
    renormalise: bool,
) -> torch.Tensor:
    """What a layer pruned to ``subset`` computes: ``[T, H]``, or ``[B, T, H]`` for ``B`` subsets.

    ``subset`` is a list of kept expert ids, or a ``[B, s]`` tensor of ``B`` equal-size
    subsets evaluated at once. Routing follows :func:`restricted_gates`; with ``subset``
    = all experts this reproduces the original layer's routed output.
    """
    weights, chosen = restricted_gates(router_logits, subset, top_k, renormalise)
    tokens = torch.arange(router_logits.shape[0]).unsqueeze(-1)  # [T, 1] broadcasts against [..., T, k]
    return torch.einsum("...tk,...tkh->...th", weights, expert_out[tokens, chosen])


def reconstruction_error(
    layer: LayerSignals, subsets: Sequence[int] | torch.Tensor, top_k: int, renormalise: bool
) -> torch.Tensor:
    """Per-token squared error ``||y_t - F(x_t; S_b)||^2`` of each subset: ``[B, T]`` (float64).

    Every reconstruction loss of every method sums or averages these (over all tokens,
    a sequence, or a token cluster). Subsets are evaluated in chunks so thousands of
    candidate subsets (exhaustive enumeration) never materialise at once.
    """
    ids = as_subsets(subsets)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    per_subset = layer.tokens * min(top_k, ids.shape[-1]) * max(layer.hidden_size, ids.shape[-1])
    chunk = max(1, _CHUNK_ELEMENTS // per_subset)
    out = []
    for start in range(0, ids.shape[0], chunk):
        recon = moe_output(layer.router_logits, layer.expert_out, ids[start : start + chunk], top_k, renormalise)
        out.append((recon - layer.layer_out).square().sum(dim=-1, dtype=torch.float64))
    return torch.cat(out)


def routed_gates(layer: LayerSignals, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Original (unpruned) routing as dense ``[T, E]`` tensors: ``(gate weights, routed mask)``.

    ``routed[t, e]`` marks the tokens routed to each expert (``X_e`` in the method
    definitions); it is returned apart from the weights because a routed expert's raw
    softmax weight can underflow to zero.
    """
    weights, chosen = restricted_gates(layer.router_logits, range(layer.num_experts), top_k, renormalise)
    gates = torch.zeros_like(layer.router_logits).scatter_(1, chosen, weights)
    routed = torch.zeros_like(layer.router_logits, dtype=torch.bool).scatter_(1, chosen, True)
    return gates, routed
