"""Routing capture inside the vLLM forward pass, cheap enough to leave on in production.

Python hooks installed after vLLM compiles the model never run (torch.compile on CPU,
CUDA-graph replay on GPU). So capture is plain tensor code on buffers registered on the
model at construction (:class:`RoutingRecorder`), in two parts:

1. inside each MoE block's forward, which vLLM compiles: one matrix product writes the
   layer's router logits over every original expert into a ``[tokens, layers, experts]``
   scratch buffer (:meth:`RoutingRecorder.record`);
2. once per forward pass, after the compiled model returns, in the model class's own
   (uncompiled) forward: routing, counting and sampling for all layers at once
   (:meth:`RoutingRecorder.count`), with no data-dependent Python and no host read, so a
   CUDA graph captured around the model repeats it on the same buffers.

Counting per layer inside the graph cost a dozen small kernels per layer; batched once
per step it costs about as many kernel calls in all, so the fixed cost no longer grows
with the number of layers.

What is recorded per MoE layer (see :class:`vllm_moe_prune.stats.RoutingStats`), always
in ORIGINAL expert ids, also on a pruned variant:

* the full router (every original expert's row, kept on the recorder as a buffer) gives the
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

from vllm.forward_context import get_forward_context, is_forward_context_available

from vllm_moe_prune.families import MoEShape
from vllm_moe_prune.stats import RoutingStats


#: Bound on the temporaries of one count pass: the dense ``[tokens, layers, experts]``
#: rows it builds are made for as many MoE layers at a time as fit, so a long prefill on a
#: model with many layers does not allocate gigabytes for a moment.
COUNT_PASS_BYTES = 64 << 20
#: Dense float32 ``[tokens, layers, experts]`` tensors alive at once in a count pass
#: (probabilities, scores, choice, routed and gated rows, their weighted stack).
_DENSE_TENSORS = 8


def token_weights(num_tokens: int, active: torch.Tensor) -> torch.Tensor:
    """``[T]`` float32: 1 for a real token while recording is on, 0 for padding or when off.

    Tensor operations only (no host read), so a CUDA graph that captured them reads the
    current on/off flag and vLLM's persistent ``is_padding`` buffer at every replay.
    """
    weight = active.expand(num_tokens)
    if is_forward_context_available():
        is_padding = get_forward_context().is_padding
        if is_padding is not None:
            weight = weight * (~is_padding[:num_tokens]).to(weight)
    return weight


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class RoutingRecorder(nn.Module):
    """The model-wide capture state: router rows, statistics buffers, the on/off switch.

    Buffers are non-persistent (never in a state dict) and created on the model's device
    at construction, so the compiled graph and CUDA graphs capture their addresses once,
    and vLLM's memory profiling counts them with the model. The largest is the logits
    scratch: ``max_tokens x MoE layers x experts`` float32 (for example 2 MiB on the
    testbed at 8192 tokens, 192 MiB for 48 layers of 128 experts).
    """

    def __init__(self, shape: MoEShape, hidden_size: int, max_tokens: int, sample_capacity: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.moe_layers = shape.moe_layers
        self.num_experts = num_experts = shape.num_experts
        self.top_k = top_k = shape.top_k
        num_layers = len(shape.moe_layers)

        def buffer(name: str, *size: int, dtype: torch.dtype = torch.float32) -> None:
            self.register_buffer(name, torch.zeros(*size, dtype=dtype), persistent=False)

        # What each layer routes with, in original expert ids: every expert's router row,
        # 0 or -inf (an expert the checkpoint lacks, in a non-uniform export), the experts
        # the variant keeps, and DeepSeek-V3's e_score_correction_bias.
        buffer("router", num_layers, num_experts, hidden_size)
        buffer("held_bias", num_layers, num_experts)
        buffer("kept", num_layers, num_experts, dtype=torch.bool)
        self._pruned = [False] * num_layers
        self.score_bias: torch.Tensor | None
        score_bias = torch.zeros(num_layers, num_experts, dtype=torch.float32) if shape.family.router_extras else None
        self.register_buffer("score_bias", score_bias, persistent=False)
        # Token-major and flat: row ``t * layers + slot``. Each layer writes its rows with one
        # ``index_copy_``, which the compiled graph performs in place; a write through a
        # slice view made inductor copy the whole buffer every step.
        buffer("logits", max_tokens * num_layers, num_experts)
        buffer("active", 1)
        self._on = False  # the same switch, read in Python (see count)
        # Running totals in float64: integer counts stay exact up to 2**53. Traced tokens
        # are not kept apart: every one adds exactly top_k to each layer's counts.
        buffer("totals", num_layers, 3, num_experts, dtype=torch.float64)  # routed, gate, prob
        buffer("transitions", max(num_layers - 1, 0), num_experts, num_experts, dtype=torch.float64)
        # Sampling ring (unsampled tokens all write the scratch row at index capacity).
        buffer("sample_rate", 1)
        buffer("sample_ids", sample_capacity + 1, num_layers, top_k, dtype=torch.int32)
        buffer("sample_probs", sample_capacity + 1, num_layers, top_k)
        buffer("sample_count", 1, dtype=torch.int64)

    def set_kept(self, slot: int, kept: list[int]) -> None:
        """The original ids MoE layer ``slot`` of the variant routes to (set before serving)."""
        self.kept[slot] = False
        self.kept[slot, kept] = True
        # Read by count() in Python: a layer keeping every expert skips the masking ops.
        self._pruned[slot] = len(kept) < self.num_experts

    def set_router(self, slot: int, rows: torch.Tensor, kept: list[int]) -> None:
        """Load MoE layer ``slot``'s router: the ``rows`` the checkpoint holds and the ids kept."""
        held = rows.shape[0]
        self.router[slot, :held].copy_(rows.float())
        self.held_bias[slot, held:] = float("-inf")
        self.set_kept(slot, kept)

    def set_score_bias(self, slot: int, bias: torch.Tensor) -> None:
        self.score_bias[slot, : bias.shape[0]].copy_(bias.float())

    def record(self, hidden: torch.Tensor, slot: int) -> None:
        """Keep MoE layer ``slot``'s router logits over every original expert for ``hidden [T, H]``.

        Called inside the MoE block, so it is traced into vLLM's compiled graph: one
        matrix product into the logits scratch, nothing else. Everything that depends on
        the routing rule runs once per forward pass for all layers at once (:meth:`count`),
        which costs a few kernel calls per step instead of a dozen per layer.
        """
        rows = torch.arange(hidden.shape[0], device=hidden.device) * len(self.moe_layers) + slot
        self.logits.index_copy_(0, rows, torch.addmm(self.held_bias[slot], hidden.float(), self.router[slot].t()))

    def route(self, logits: torch.Tensor, layers: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-softmax ``probs [T, l, E]`` and the variant's choice ``(ids, gates) [T, l, k]``.

        ``logits [T, l, E]`` are those of the MoE layers ``layers``. The variant routes among
        its kept experts only: softmax over them is the full softmax restricted to them and
        rescaled; DeepSeek-V3 scores each expert with a sigmoid and chooses by score plus
        correction bias. With groups (every group keeps the same number of experts), a
        token first picks ``topk_groups`` groups by their best (V2) or two best (V3) kept
        choice scores, then its top-k experts inside them. Ids are original expert ids.
        """
        shape = self.shape
        probs = logits.softmax(dim=-1)
        scores = logits.sigmoid() if shape.scoring == "sigmoid" else probs
        pruned = any(self._pruned[layers])
        if pruned:
            kept = self.kept[layers]
            scores = scores * kept
            if shape.scoring != "sigmoid":
                scores = scores / scores.sum(dim=-1, keepdim=True)
        choice = scores if self.score_bias is None else scores + self.score_bias[layers]
        if pruned:
            choice = choice.masked_fill(~kept, float("-inf"))
        if shape.num_groups > 1:
            grouped = choice.unflatten(-1, (shape.num_groups, -1))
            if shape.group_score == "top2_sum":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            picked = group_scores.topk(shape.topk_groups, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, picked, True)
            choice = grouped.masked_fill(~allowed[..., None], float("-inf")).flatten(-2)
        ids = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, ids)
        if shape.renormalise:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, ids, gates

    @torch.no_grad()
    def count(self, num_tokens: int) -> None:
        """Add the routing of the forward pass that just ran (its first ``num_tokens`` rows).

        Runs after the model's compiled graph, once per step, over every MoE layer's
        logits at once. Tensor operations only, whose shapes depend on nothing but
        ``num_tokens``, so it is also captured into, and replayed from, a CUDA graph
        (which multiplies by the on/off flag when replayed); outside graph capture it
        returns at once while recording is off, so tracing off costs one product per
        layer.
        Sums are weighted by the token weights (0/1), so padding and traffic while
        recording is off add nothing; per step they are float32 sums of 0/1 terms, exact
        below 2**24 tokens, added into the float64 totals.
        """
        if not (self._on or _capturing_cuda_graph()):
            return  # off, and no graph will replay this step: nothing would be added
        weight = token_weights(num_tokens, self.active)
        sampled = self._sample_rows(weight) if self.sample_capacity else None
        num_layers = len(self.moe_layers)
        logits = self.logits[: num_tokens * num_layers].view(num_tokens, num_layers, self.num_experts)
        chunk = max(1, COUNT_PASS_BYTES // (_DENSE_TENSORS * 4 * num_tokens * self.num_experts))
        previous: torch.Tensor | None = None  # the routed rows of the layer before this chunk
        for start in range(0, num_layers, chunk):
            layers = slice(start, min(start + chunk, num_layers))
            probs, ids, gates = self.route(logits[:, layers], layers)
            routed = torch.zeros_like(probs).scatter_(-1, ids, 1.0)
            gated = torch.zeros_like(probs).scatter_(-1, ids, gates)
            stacked = torch.stack((routed, gated, probs), dim=2)  # [T, l, 3, E]
            self.totals[layers] += (weight @ stacked.flatten(1)).view(stacked.shape[1:])
            # transitions[l] pairs layer l's routed rows (token-weighted) with layer l+1's.
            if previous is not None:
                routed = torch.cat((previous[:, None], routed), dim=1)
            first = start - (previous is not None)
            if routed.shape[1] > 1:
                before = (routed[:, :-1] * weight[:, None, None]).permute(1, 2, 0)  # [l, E, T]
                self.transitions[first : first + before.shape[0]] += before @ routed[:, 1:].transpose(0, 1)
            previous = routed[:, -1]
            if sampled is not None:
                self.sample_ids[sampled, layers] = ids.to(self.sample_ids.dtype)
                self.sample_probs[sampled, layers] = probs.gather(-1, ids)

    def _sample_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Ring row of each token of this step: a random share of the traced ones, else scratch."""
        capacity = self.sample_capacity
        chosen = weight.bool() & (torch.rand(weight.shape[0], device=weight.device) < self.sample_rate)
        ring = (self.sample_count + chosen.long().cumsum(0) - 1) % capacity
        self.sample_count += chosen.long().sum()
        return torch.where(chosen, ring, capacity)

    @property
    def sample_capacity(self) -> int:
        return self.sample_ids.shape[0] - 1

    def set_active(self, on: bool) -> None:
        self.active.fill_(float(on))
        self._on = on

    def set_sample_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {rate}")
        if rate > 0 and self.sample_capacity == 0:
            raise ValueError("sampling needs a sample capacity: start the server with MOE_PRUNE_SAMPLE_CAPACITY set")
        self.sample_rate.fill_(rate)

    @property
    def traced_tokens(self) -> int:
        """Tokens counted since the last drain: the first layer's routed count over top_k."""
        return int(self.totals[0, 0].sum().round()) // self.top_k

    def snapshot(self) -> RoutingStats:
        """The statistics gathered since the last drain (a copy; resets nothing)."""
        totals = self.totals.cpu()
        return RoutingStats(
            moe_layers=self.moe_layers,
            top_k=self.top_k,
            tokens=self.traced_tokens,
            counts=totals[:, 0].round().long(),
            gate_sum=totals[:, 1].clone(),
            prob_sum=totals[:, 2].clone(),
            transitions=self.transitions.cpu().round().long(),
        )

    def _drain_samples(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sampled rows, oldest first, and how many older samples the ring overwrote."""
        count, capacity = int(self.sample_count.item()), self.sample_capacity
        if count <= capacity:
            order = torch.arange(count)
        else:
            start = count % capacity
            order = torch.cat([torch.arange(start, capacity), torch.arange(start)])
        ids = self.sample_ids[order].cpu()
        probs = self.sample_probs[order].cpu()
        self.sample_count.zero_()
        return ids, probs, max(0, count - capacity)

    @torch.no_grad()
    def drain(self) -> tuple[RoutingStats, dict[str, Any] | None]:
        """Return the statistics (and samples) gathered so far and zero them, in one step.

        Called between forward passes (from the worker's RPC thread of control), so no
        token is counted twice or lost between two drains.
        """
        stats = self.snapshot()
        for buffer in (self.totals, self.transitions):
            buffer.zero_()
        if self.sample_capacity == 0:
            return stats, None
        ids, probs, dropped = self._drain_samples()
        return stats, {"topk_ids": ids.tolist(), "topk_probs": probs.tolist(), "dropped": dropped}
