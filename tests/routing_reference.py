"""Routing statistics computed independently with transformers, for capture tests.

transformers returns every MoE layer's router logits (``output_router_logits``); from
them this module counts top-k hits, sums full-softmax probabilities and applied gate
weights, and counts layer-to-layer transitions, with none of the plugin's code.
"""

from __future__ import annotations

import torch

from vllm_moe_prune.families import MoEShape


@torch.no_grad()
def reference_stats(model, shape: MoEShape, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    num_layers, num_experts, k = len(shape.moe_layers), shape.num_experts, shape.top_k
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    prob_sum = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    gate_sum = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    transitions = torch.zeros(num_layers - 1, num_experts, num_experts, dtype=torch.int64)
    tokens = 0
    for ids in sequences:
        out = model(torch.tensor([ids]), output_router_logits=True)
        previous = None
        for slot, logits in enumerate(out.router_logits):
            probs = logits.float().softmax(dim=-1)
            gates, chosen = probs.topk(k, dim=-1)
            if shape.renormalise:
                gates = gates / gates.sum(dim=-1, keepdim=True)
            for t in range(chosen.shape[0]):
                for j in range(k):
                    counts[slot, chosen[t, j]] += 1
                    gate_sum[slot, chosen[t, j]] += float(gates[t, j])
                    if previous is not None:
                        for i in range(k):
                            transitions[slot - 1, previous[t, i], chosen[t, j]] += 1
            prob_sum[slot] += probs.sum(dim=0).double()
            previous = chosen
        tokens += len(ids)
    return {"tokens": torch.tensor(tokens), "counts": counts, "prob_sum": prob_sum, "gate_sum": gate_sum, "transitions": transitions}
