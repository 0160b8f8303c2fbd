"""Routing capture inside the vLLM forward pass, cheap enough to leave on in production.

Python hooks installed after vLLM compiles the model never run (torch.compile on CPU,
CUDA-graph replay on GPU). So the statistics live in tensors registered on the model at
construction (:class:`RoutingRecorder`) and are updated by one custom op per MoE layer,
``moe_prune::record_routing``, which torch.compile treats as opaque and which does only
tensor work (no data-dependent Python), so a replayed CUDA graph updates the same
buffers.

What is recorded per MoE layer (see :class:`vllm_moe_prune.stats.RoutingStats`), always
in ORIGINAL expert ids, also on a pruned variant:

* the full router (every original expert's row, kept on the model as a buffer) gives the
  full-softmax probabilities: ``prob_sum`` and, from it, live coverage of the kept set;
* the routing the variant really performs (softmax over the kept experts' logits, top-k,
  optional renormalisation) gives ``counts``, ``gate_sum`` and layer-to-layer
  ``transitions``.

Optional per-token sampling (off unless the server is started with a sample capacity):
a random share of the traced tokens, chosen once per forward pass, has its top-k ids and
their full-softmax probabilities written, for every MoE layer, into a ring buffer of
fixed capacity, so memory stays bounded whatever the traffic. Neither text nor token ids
are captured.

Tokens vLLM marks as padding (``forward_context.is_padding``: warm-up and CUDA-graph
padding rows) and every token while recording is off carry weight zero, so each layer's
counts sum to exactly ``tokens * top_k`` of the traffic served while recording was on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vllm_moe_prune.stats import RoutingStats


def _padding_mask(num_tokens: int, device: torch.device) -> torch.Tensor:
    """``[T]`` bool, True for real tokens, read from vLLM's forward context at run time."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if is_forward_context_available():
        is_padding = get_forward_context().is_padding
        if is_padding is not None:
            return ~is_padding[:num_tokens].to(device)
    return torch.ones(num_tokens, dtype=torch.bool, device=device)


@torch.library.custom_op(
    "moe_prune::record_routing",
    mutates_args=(
        "counts", "prob_sum", "gate_sum", "transitions", "tokens", "last_ids",
        "sample_ids", "sample_probs", "sample_rows", "sample_count",
    ),
)
def record_routing(
    hidden: torch.Tensor,
    router: torch.Tensor,
    kept: torch.Tensor,
    active: torch.Tensor,
    counts: torch.Tensor,
    prob_sum: torch.Tensor,
    gate_sum: torch.Tensor,
    transitions: torch.Tensor,
    tokens: torch.Tensor,
    last_ids: torch.Tensor,
    sample_rate: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_probs: torch.Tensor,
    sample_rows: torch.Tensor,
    sample_count: torch.Tensor,
    slot: int,
    top_k: int,
    renormalise: bool,
) -> None:
    """Add one MoE layer's routing of ``hidden [T, H]`` to the statistics at ``slot``."""
    num_tokens = hidden.shape[0]
    num_experts = router.shape[0]
    weight = _padding_mask(num_tokens, hidden.device) & active.bool()
    logits = hidden.float() @ router.float().t()
    probs = logits.softmax(dim=-1)
    prob_sum[slot] += (probs * weight[:, None]).sum(dim=0).double()
    gates, local = logits[:, kept].softmax(dim=-1).topk(top_k, dim=-1)
    if renormalise:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    ids = kept[local]
    counts[slot].index_add_(0, ids.flatten(), weight.long().repeat_interleave(top_k))
    gate_sum[slot].index_add_(0, ids.flatten(), (gates * weight[:, None]).flatten().double())
    if slot > 0:
        pairs = last_ids[:num_tokens, :, None] * num_experts + ids[:, None, :]
        transitions[slot - 1].view(-1).index_add_(0, pairs.flatten(), weight.long().repeat_interleave(top_k * top_k))
    else:
        tokens += weight.long().sum()
    last_ids[:num_tokens] = ids
    capacity = sample_ids.shape[0] - 1  # the last row takes the writes of unsampled tokens
    if capacity > 0:
        if slot == 0:
            chosen = weight & (torch.rand(num_tokens, device=hidden.device) < sample_rate)
            ring = (sample_count + chosen.long().cumsum(0) - 1) % capacity
            sample_rows[:num_tokens] = torch.where(chosen, ring, capacity)
            sample_count += chosen.long().sum()
        rows = sample_rows[:num_tokens]
        sample_ids[rows, slot] = ids.to(sample_ids.dtype)
        sample_probs[rows, slot] = probs.gather(1, ids)


@record_routing.register_fake
def _(hidden, router, kept, active, counts, prob_sum, gate_sum, transitions, tokens, last_ids,
      sample_rate, sample_ids, sample_probs, sample_rows, sample_count, slot, top_k, renormalise):
    return None


class RoutingRecorder(nn.Module):
    """The model-wide capture state: statistics buffers plus the on/off switch.

    Buffers are non-persistent (never in a state dict) and created on the model's device
    at construction, so the compiled graph and CUDA graphs capture their addresses once.
    """

    def __init__(
        self, moe_layers: list[int], num_experts: int, top_k: int, max_tokens: int, sample_capacity: int = 0
    ) -> None:
        super().__init__()
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        self.top_k = top_k
        num_layers = len(moe_layers)
        self.register_buffer("active", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.register_buffer("tokens", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.register_buffer("counts", torch.zeros(num_layers, num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("prob_sum", torch.zeros(num_layers, num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("gate_sum", torch.zeros(num_layers, num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer(
            "transitions",
            torch.zeros(max(num_layers - 1, 0), num_experts, num_experts, dtype=torch.int64),
            persistent=False,
        )
        self.register_buffer("last_ids", torch.zeros(max_tokens, top_k, dtype=torch.int64), persistent=False)
        # Sampling ring: ``sample_capacity`` rows plus one scratch row (see record_routing).
        self.register_buffer("sample_rate", torch.zeros(1, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "sample_ids", torch.zeros(sample_capacity + 1, num_layers, top_k, dtype=torch.int32), persistent=False
        )
        self.register_buffer(
            "sample_probs", torch.zeros(sample_capacity + 1, num_layers, top_k, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "sample_rows", torch.zeros(max_tokens if sample_capacity else 1, dtype=torch.int64), persistent=False
        )
        self.register_buffer("sample_count", torch.zeros(1, dtype=torch.int64), persistent=False)

    def record(self, hidden: torch.Tensor, router: torch.Tensor, kept: torch.Tensor, slot: int, renormalise: bool) -> None:
        torch.ops.moe_prune.record_routing(
            hidden, router, kept, self.active, self.counts, self.prob_sum, self.gate_sum,
            self.transitions, self.tokens, self.last_ids, self.sample_rate, self.sample_ids,
            self.sample_probs, self.sample_rows, self.sample_count, slot, self.top_k, renormalise,
        )

    @property
    def sample_capacity(self) -> int:
        return self.sample_ids.shape[0] - 1

    def set_active(self, on: bool) -> None:
        self.active.fill_(int(on))

    def set_sample_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {rate}")
        if rate > 0 and self.sample_capacity == 0:
            raise ValueError("sampling needs a sample capacity: start the server with VLLM_MOE_PRUNE_SAMPLE_CAPACITY set")
        self.sample_rate.fill_(rate)

    def _drain_samples(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sampled rows, oldest first, and how many older samples the ring overwrote."""
        count, capacity = int(self.sample_count.item()), self.sample_capacity
        if count <= capacity:
            order = torch.arange(count)
        else:
            start = count % capacity
            order = torch.cat([torch.arange(start, capacity), torch.arange(start)])
        ids, probs = self.sample_ids[order].cpu().clone(), self.sample_probs[order].cpu().clone()
        self.sample_count.zero_()
        return ids, probs, max(0, count - capacity)

    @torch.no_grad()
    def drain(self) -> tuple[RoutingStats, dict[str, Any] | None]:
        """Return the statistics (and samples) gathered so far and zero them, in one step.

        Called between forward passes (from the worker's RPC thread of control), so no
        token is counted twice or lost between two drains.
        """
        stats = RoutingStats(
            moe_layers=self.moe_layers,
            top_k=self.top_k,
            tokens=int(self.tokens.item()),
            counts=self.counts.cpu().clone(),
            prob_sum=self.prob_sum.cpu().clone(),
            gate_sum=self.gate_sum.cpu().clone(),
            transitions=self.transitions.cpu().clone(),
        )
        for buffer in (self.tokens, self.counts, self.prob_sum, self.gate_sum, self.transitions):
            buffer.zero_()
        if self.sample_capacity == 0:
            return stats, None
        ids, probs, dropped = self._drain_samples()
        return stats, {"topk_ids": ids.tolist(), "topk_probs": probs.tolist(), "dropped": dropped}
