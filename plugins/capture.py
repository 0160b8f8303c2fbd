"""Routing capture inside the vLLM forward pass, cheap enough to leave on in production.

Python hooks installed after vLLM compiles the model never run (torch.compile on CPU,
CUDA-graph replay on GPU). So the statistics live in tensors registered on the model at
construction (:class:`RoutingRecorder`) and are updated by plain tensor operations in
each MoE block's forward (no data-dependent Python), which torch.compile traces into the
model's graph and fuses, and which a replayed CUDA graph repeats on the same buffers.

What is recorded per MoE layer (see :class:`vllm_moe_prune.stats.RoutingStats`), always
in ORIGINAL expert ids, also on a pruned variant:

* the full router (every original expert's row, kept on the model as a buffer) gives the
  full-softmax probabilities: ``prob_sum`` and, from it, live coverage of the kept set;
* the routing the variant really performs, restricted to its kept experts (softmax or
  DeepSeek-V3's sigmoid scores, DeepSeek's score-correction bias and grouped top-k,
  top-k, optional renormalisation; see :meth:`RoutingRecorder.route`) gives ``counts``,
  ``gate_sum`` (gate weights before DeepSeek's constant ``routed_scaling_factor``) and
  layer-to-layer ``transitions``.

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

from vllm_moe_prune.families import MoEShape
from vllm_moe_prune.stats import RoutingStats


@torch.library.custom_op("moe_prune::token_weights", mutates_args=())
def token_weights(hidden: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``[T]`` float32: 1 for a real token while recording is on, 0 for padding or when off.

    vLLM's padding mask lives in its forward context, which a compiled graph cannot read
    (Dynamo would freeze it at trace time); this opaque op reads it at run time, once per
    forward pass. It slices vLLM's persistent ``is_padding`` buffer, so a replayed CUDA
    graph reads the current mask too.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    num_tokens = hidden.shape[0]
    real = torch.ones(num_tokens, dtype=torch.bool, device=hidden.device)
    if is_forward_context_available():
        is_padding = get_forward_context().is_padding
        if is_padding is not None:
            real = ~is_padding[:num_tokens].to(hidden.device)
    return (real & active.bool()).float()


@token_weights.register_fake
def _(hidden: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


class RoutingRecorder(nn.Module):
    """The model-wide capture state: statistics buffers plus the on/off switch.

    Buffers are non-persistent (never in a state dict) and created on the model's device
    at construction, so the compiled graph and CUDA graphs capture their addresses once.
    """

    def __init__(self, shape: MoEShape, max_tokens: int, sample_capacity: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.moe_layers = shape.moe_layers
        self.num_experts = num_experts = shape.num_experts
        self.top_k = top_k = shape.top_k
        num_layers = len(shape.moe_layers)
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
        # The previous MoE layer's routing of each token as a 0/1 row over experts, so a
        # transition update is one [E, T] x [T, E] product (no scatter over pairs).
        self.register_buffer("last_routed", torch.zeros(max_tokens, num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("weights", torch.zeros(max_tokens, dtype=torch.float32), persistent=False)
        # Sampling ring, flat: row ``r`` of layer slot ``s`` is ``r * num_layers + s``, so a
        # layer's write is one ``index_copy_`` into the buffer itself, which the compiled
        # graph performs in place (writing through a ``[rows, slot]`` view made inductor
        # copy the whole ring every step). Unsampled tokens all write one scratch row.
        self.register_buffer("sample_rate", torch.zeros(1, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "sample_ids", torch.zeros((sample_capacity + 1) * num_layers, top_k, dtype=torch.int32), persistent=False
        )
        self.register_buffer(
            "sample_probs", torch.zeros((sample_capacity + 1) * num_layers, top_k, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "sample_rows", torch.zeros(max_tokens if sample_capacity else 1, dtype=torch.int64), persistent=False
        )
        self.register_buffer("sample_count", torch.zeros(1, dtype=torch.int64), persistent=False)

    def route(
        self, logits: torch.Tensor, probs: torch.Tensor, score_bias: torch.Tensor | None, kept: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The variant's own choice among ``kept``: ``(ids [T, k] original ids, gates [T, k])``.

        Softmax over the kept experts' logits is the full softmax restricted to them and
        rescaled; DeepSeek-V3 scores each expert with a sigmoid and chooses by score plus
        correction bias. With groups (``kept`` holds the same number of experts of every
        group, in order), a token first picks ``topk_groups`` groups by their best (V2) or
        two best (V3) choice scores, then its top-k experts inside them.
        """
        shape = self.shape
        if shape.scoring == "sigmoid":
            scores = logits[:, kept].sigmoid()
        else:
            scores = probs[:, kept]
            scores = scores / scores.sum(dim=-1, keepdim=True)
        choice = scores if score_bias is None else scores + score_bias[kept]
        if shape.num_groups > 1:
            grouped = choice.view(choice.shape[0], shape.num_groups, -1)
            if shape.group_score == "top2_sum":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            picked = group_scores.topk(shape.topk_groups, dim=-1).indices
            allowed = torch.zeros_like(group_scores).scatter_(1, picked, 1.0)
            choice = choice.masked_fill(allowed[:, :, None].expand_as(grouped).reshape_as(choice) == 0, float("-inf"))
        local = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(1, local)
        if shape.renormalise:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return kept[local], gates

    def record(
        self, hidden: torch.Tensor, router: torch.Tensor, router_bias: torch.Tensor, score_bias: torch.Tensor | None,
        kept: torch.Tensor, slot: int,
    ) -> None:
        """Add one MoE layer's routing of ``hidden [T, H]`` to the statistics at ``slot``.

        ``router [E, H]`` holds every expert's row and ``router_bias [E]`` is 0, or -inf
        for an expert the checkpoint lacks; ``score_bias [E]`` is DeepSeek-V3's
        ``e_score_correction_bias`` (None elsewhere); ``kept`` are the ids the variant
        routes to.

        Plain tensor code: it is traced into vLLM's compiled graph and fused there. The
        first MoE layer of a forward pass fetches the token weights (the only opaque
        call) and picks the sampled tokens; the later layers reuse both.

        The sums are weighted reductions rather than scatters: ``weights [T]`` times the
        dense ``[T, E]`` rows of routed flags, gates and probabilities (and, for
        transitions, the previous layer's routed rows times this layer's). Flags and token
        weights are 0/1, so the float32 sums are exact integers for any batch below 2**24
        tokens; they are widened into the int64 / float64 totals once per step.
        """
        num_tokens = hidden.shape[0]
        if slot == 0:
            self.weights[:num_tokens] = torch.ops.moe_prune.token_weights(hidden, self.active)
        weight = self.weights[:num_tokens]
        logits = hidden.float() @ router.t() + router_bias
        probs = logits.softmax(dim=-1)
        ids, gates = self.route(logits, probs, score_bias, kept)
        routed = torch.zeros_like(probs).scatter_(1, ids, 1.0)
        gated = torch.zeros_like(probs).scatter_(1, ids, gates)
        # Three fused reductions, not one product over a concatenation: inductor (torch
        # 2.13) reuses a concatenation's memory while views of it are still read later.
        column = weight[:, None]
        self.counts[slot] += (routed * column).sum(dim=0).round().long()
        self.gate_sum[slot] += (gated * column).sum(dim=0).double()
        self.prob_sum[slot] += (probs * column).sum(dim=0).double()
        if slot > 0:
            pairs = (self.last_routed[:num_tokens] * weight[:, None]).t() @ routed
            self.transitions[slot - 1] += pairs.round().long()
        else:
            self.tokens += weight.sum().round().long()
        self.last_routed[:num_tokens] = routed
        if self.sample_capacity:
            self._sample(ids, probs, slot, weight)

    def _sample(self, ids: torch.Tensor, probs: torch.Tensor, slot: int, weight: torch.Tensor) -> None:
        """Write the sampled tokens' routing into the ring; unsampled rows hit a scratch row."""
        num_tokens, capacity = ids.shape[0], self.sample_capacity
        if slot == 0:
            chosen = weight.bool() & (torch.rand(num_tokens, device=ids.device) < self.sample_rate)
            ring = (self.sample_count + chosen.long().cumsum(0) - 1) % capacity
            self.sample_rows[:num_tokens] = torch.where(chosen, ring, capacity)
            self.sample_count += chosen.long().sum()
        flat = self.sample_rows[:num_tokens] * len(self.moe_layers) + slot
        self.sample_ids.index_copy_(0, flat, ids.to(self.sample_ids.dtype))
        self.sample_probs.index_copy_(0, flat, probs.gather(1, ids))

    @property
    def sample_capacity(self) -> int:
        return self.sample_ids.shape[0] // len(self.moe_layers) - 1

    def set_active(self, on: bool) -> None:
        self.active.fill_(int(on))

    def set_sample_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {rate}")
        if rate > 0 and self.sample_capacity == 0:
            raise ValueError("sampling needs a sample capacity: start the server with MOE_PRUNE_SAMPLE_CAPACITY set")
        self.sample_rate.fill_(rate)

    def _drain_samples(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sampled rows, oldest first, and how many older samples the ring overwrote."""
        count, capacity = int(self.sample_count.item()), self.sample_capacity
        if count <= capacity:
            order = torch.arange(count)
        else:
            start = count % capacity
            order = torch.cat([torch.arange(start, capacity), torch.arange(start)])
        shape = (self.sample_capacity + 1, len(self.moe_layers), self.top_k)
        ids = self.sample_ids.view(shape)[order].cpu().clone()
        probs = self.sample_probs.view(shape)[order].cpu().clone()
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
