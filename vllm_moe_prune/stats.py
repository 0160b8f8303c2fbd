"""Routing statistics: the plain-tensor contract between capture and the planner.

Production capture accumulates exactly these tensors inside the forward pass, trace
shards store them, merging adds them, and every pruning method reads them. Index 0 of
each ``[L, ...]`` tensor is the first MoE layer of the model (``moe_layers[0]``), not
decoder layer 0: models with dense leading layers keep a dense index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_moe_prune.errors import UserError

TENSOR_NAMES = ("counts", "prob_sum", "gate_sum", "transitions")


class StatsError(UserError):
    """Statistics that are inconsistent, negative or not finite."""


def tensor_layout(num_layers: int, num_experts: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every statistics tensor: the one definition readers check against."""
    return {
        "counts": ((num_layers, num_experts), torch.int64),
        "prob_sum": ((num_layers, num_experts), torch.float64),
        "gate_sum": ((num_layers, num_experts), torch.float64),
        "transitions": ((max(num_layers - 1, 0), num_experts, num_experts), torch.int64),
    }


@dataclass
class RoutingStats:
    """Routing statistics of traced traffic.

    * ``counts[l, e]``: tokens routed to expert ``e`` in MoE layer ``l`` (top-k hits);
    * ``prob_sum[l, e]``: sum over tokens of the full-softmax router probability of ``e``;
    * ``gate_sum[l, e]``: sum over routed tokens of the gate weight actually applied;
    * ``transitions[l, a, b]``: tokens routed to ``a`` in MoE layer ``l`` and to ``b`` in
      MoE layer ``l + 1`` (each token contributes ``top_k**2`` pairs);
    * ``tokens``: traced tokens. For any traffic, ``counts[l].sum() == tokens * top_k``.
    """

    moe_layers: tuple[int, ...]
    top_k: int
    tokens: int
    counts: torch.Tensor
    prob_sum: torch.Tensor
    gate_sum: torch.Tensor
    transitions: torch.Tensor

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @classmethod
    def zeros(cls, moe_layers: tuple[int, ...] | list[int], num_experts: int, top_k: int) -> "RoutingStats":
        num_layers = len(moe_layers)
        return cls(
            moe_layers=tuple(moe_layers),
            top_k=top_k,
            tokens=0,
            counts=torch.zeros(num_layers, num_experts, dtype=torch.int64),
            prob_sum=torch.zeros(num_layers, num_experts, dtype=torch.float64),
            gate_sum=torch.zeros(num_layers, num_experts, dtype=torch.float64),
            transitions=torch.zeros(max(num_layers - 1, 0), num_experts, num_experts, dtype=torch.int64),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values: what crosses process boundaries (RPC, JSON) unchanged."""
        return {
            "moe_layers": list(self.moe_layers),
            "top_k": self.top_k,
            "tokens": self.tokens,
            **{name: tensor.tolist() for name, tensor in self.tensors().items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingStats":
        """Inverse of :meth:`to_dict`; validates the result."""
        moe_layers = tuple(int(x) for x in data["moe_layers"])
        num_experts = len(data["counts"][0])
        layout = tensor_layout(len(moe_layers), num_experts)
        stats = cls(
            moe_layers=moe_layers,
            top_k=int(data["top_k"]),
            tokens=int(data["tokens"]),
            # reshape: an empty list (one MoE layer, no transitions) carries no shape.
            **{name: torch.tensor(data[name], dtype=dtype).reshape(shape) for name, (shape, dtype) in layout.items()},
        )
        stats.validate()
        return stats

    def validate(self) -> None:
        """Check shapes, dtypes, signs, finiteness and the exact count invariant."""
        for name, (shape, dtype) in tensor_layout(self.num_layers, self.num_experts).items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise StatsError(f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
            if not torch.isfinite(tensor.double()).all():
                raise StatsError(f"{name}: contains NaN or infinite values")
            if (tensor < 0).any():
                raise StatsError(f"{name}: contains negative values")
        if self.tokens < 0:
            raise StatsError(f"tokens: negative ({self.tokens})")
        routed = self.counts.sum(dim=1)
        bad = (routed != self.tokens * self.top_k).nonzero().flatten().tolist()
        if bad:
            layer = bad[0]
            raise StatsError(
                f"MoE layer {self.moe_layers[layer]}: {int(routed[layer])} routed tokens, expected "
                f"tokens x top_k = {self.tokens} x {self.top_k}"
            )
        pairs = self.transitions.sum(dim=(1, 2))
        bad = (pairs != self.tokens * self.top_k**2).nonzero().flatten().tolist()
        if bad:
            raise StatsError(
                f"transitions after MoE layer {self.moe_layers[bad[0]]}: {int(pairs[bad[0]])} pairs, expected "
                f"tokens x top_k^2 = {self.tokens * self.top_k**2}"
            )

    def compatible_with(self, other: "RoutingStats") -> bool:
        return (
            self.moe_layers == other.moe_layers
            and self.top_k == other.top_k
            and self.counts.shape == other.counts.shape
        )

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        """Merge two statistics of the same model (replicas, ranks, time ranges)."""
        if not self.compatible_with(other):
            raise StatsError(
                f"cannot merge statistics of different shapes: layers {self.moe_layers} x {self.num_experts} "
                f"experts (top-{self.top_k}) vs layers {other.moe_layers} x {other.num_experts} (top-{other.top_k})"
            )
        return RoutingStats(
            moe_layers=self.moe_layers,
            top_k=self.top_k,
            tokens=self.tokens + other.tokens,
            **{name: getattr(self, name) + getattr(other, name) for name in TENSOR_NAMES},
        )

    def routing_share(self) -> torch.Tensor:
        """``[L, E]`` share of each layer's routed tokens that each expert received."""
        return self.counts.double() / self.counts.sum(dim=1, keepdim=True).clamp(min=1)

    def kept_mass(self, kept: dict[int, list[int]]) -> torch.Tensor:
        """``[L]`` share of the router probability mass that falls on the kept experts."""
        out = torch.zeros(self.num_layers, dtype=torch.float64)
        for i, layer in enumerate(self.moe_layers):
            total = self.prob_sum[i].sum()
            out[i] = self.prob_sum[i, kept[layer]].sum() / total if total > 0 else 1.0
        return out
