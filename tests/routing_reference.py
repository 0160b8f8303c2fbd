"""Routing statistics computed independently with transformers, for capture tests.

Every transformers MoE family here routes through a ``mlp.gate`` module that returns
``(router_logits, top-k weights, top-k ids)``. A forward hook on it sees what the model
really routes to (also with tests/reference.py's pruning hooks, registered before it), and
this module counts top-k hits, sums full-softmax probabilities and gate weights (DeepSeek's
constant ``routed_scaling_factor`` divided out), and counts layer-to-layer transitions,
with none of the plugin's code.
"""

from __future__ import annotations

import torch

from vllm_moe_prune.families import MoEShape


def empty_stats(num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.tensor(0),
        "counts": torch.zeros(num_layers, num_experts, dtype=torch.int64),
        "prob_sum": torch.zeros(num_layers, num_experts, dtype=torch.float64),
        "gate_sum": torch.zeros(num_layers, num_experts, dtype=torch.float64),
        "transitions": torch.zeros(num_layers - 1, num_experts, num_experts, dtype=torch.int64),
    }


def count_layer(stats: dict[str, torch.Tensor], slot: int, probs: torch.Tensor, chosen: torch.Tensor,
                gates: torch.Tensor, previous: torch.Tensor | None) -> None:
    """Add one MoE layer's routing of ``T`` tokens, token by token: full-softmax ``probs
    [T, E]``, the original ids ``chosen`` and their ``gates`` ``[T, k]``, and ``previous``,
    the ids the same tokens chose in the layer before (None for the first)."""
    k = chosen.shape[1]
    for t in range(chosen.shape[0]):
        for j in range(k):
            stats["counts"][slot, chosen[t, j]] += 1
            stats["gate_sum"][slot, chosen[t, j]] += float(gates[t, j])
            if previous is not None:
                for i in range(k):
                    stats["transitions"][slot - 1, previous[t, i], chosen[t, j]] += 1
    stats["prob_sum"][slot, : probs.shape[1]] += probs.sum(dim=0).double()


@torch.no_grad()
def reference_stats(model, shape: MoEShape, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    stats = empty_stats(len(shape.moe_layers), shape.num_experts)
    scale = float(getattr(model.config, "routed_scaling_factor", 1.0) or 1.0)
    routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hooks = [
        model.model.layers[layer].mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out[:3]))
        for layer in shape.moe_layers
    ]
    try:
        for ids in sequences:
            routed.clear()
            model(torch.tensor([ids]))
            previous = None
            for slot, (logits, weights, chosen) in enumerate(routed):
                count_layer(stats, slot, logits.float().softmax(dim=-1), chosen, weights.float() / scale, previous)
                previous = chosen
            stats["tokens"] += len(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return stats
