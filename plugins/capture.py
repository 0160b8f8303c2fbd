"""Routing capture inside the vLLM forward pass, cheap enough to leave on in production.

Python hooks installed after vLLM compiles the model never run (torch.compile on CPU,
CUDA-graph replay on GPU). So capture is plain tensor code on buffers registered on the
model at construction (:class:`RoutingRecorder`), in two parts:

1. inside each MoE layer's router, which vLLM compiles with the model
   (:meth:`RoutingRecorder.record`), from the routing the model has just computed (its
   router logits, chosen expert ids and gate weights): the probability sum is added to
   at once (a softmax and a sum over tokens per layer), and the chosen ids and gates are
   written into a ``[tokens, layers, 3 * top_k]`` scratch buffer with one
   ``index_copy_``. Nothing is routed a second time: what is counted is exactly what
   the model did;
2. after the compiled model returns, in the model class's own (uncompiled) forward:
   counting ids and sampling for all layers at once (:meth:`RoutingRecorder.count`).

Counting is a few dozen small tensor operations whatever the number of tokens, and at
decode batch sizes their fixed cost dominates. So on CPU the scratch holds the routing of
several forward passes: each step's rows are appended at a running offset (advanced
inside the graph, so a step adds no tensor operation of its own for it), and they are
counted together once ``count_batch_tokens`` tokens wait (and before any read of the
statistics), which spreads that fixed cost over many steps. Where a CUDA graph may replay
the model, ``count_batch_tokens`` is 0: every step is counted at once, with no
data-dependent Python and no host read, so the graph repeats it on the same buffers.

What is recorded per MoE layer (see :class:`vllm_moe_prune.stats.RoutingStats`), always
in ORIGINAL expert ids, also on a pruned variant:

* ``prob_sum``: the full softmax over every original expert, and from it live coverage of
  the kept set. The model's logits cover the experts it keeps; on a pruned variant the
  router rows of the experts it dropped are kept on the recorder (a buffer), and their
  logits are one extra matrix product of the layer's input. Experts a checkpoint lacks
  (a non-uniform export) have logit -inf: probability 0;
* ``counts``, ``gate_sum`` (gate weights before DeepSeek's constant
  ``routed_scaling_factor``) and layer-to-layer ``transitions``: from the expert ids and
  weights the model's router returned, mapped from the variant's ids to the original ones.

Optional per-token sampling (off unless the server is started with a sample capacity):
a random share of the traced tokens, drawn when they are counted, has its top-k ids and
their full-softmax probabilities written, for every MoE layer, into a ring buffer of
fixed capacity, so memory stays bounded whatever the traffic. Neither text nor token ids
are captured.

Tokens vLLM marks as padding (``forward_context.is_padding``: CUDA-graph padding rows,
warm-up passes) and every token while recording is off carry weight zero, so each layer's
counts sum to exactly ``tokens * top_k`` of the traffic served while recording was on.
The graph reads the padding mask itself, from vLLM's own persistent buffer (see
:meth:`RoutingRecorder.follow_padding_mask`), so a step adds no tensor operation outside
the graph: in the worker, whose caches the model's forward has just evicted, one small
eager operation costs about 1% of a decode step of the testbed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vllm_moe_prune.families import MoEShape
from vllm_moe_prune.stats import RoutingStats


#: Bound on the temporaries of one count pass: it is made for as many MoE layers at a
#: time as fit, so a long prefill on a model with many layers does not allocate
#: gigabytes for a moment.
COUNT_PASS_BYTES = 64 << 20
#: Tokens whose routing waits in the scratch before it is counted (on CPU): a count pass
#: has a fixed cost of a few dozen tensor operations, which this spreads over many
#: decode steps.
COUNT_BATCH_TOKENS = 1024


def capturing_cuda_graph() -> bool:
    """Whether a CUDA graph is being captured now (never, on a build without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class RoutingRecorder(nn.Module):
    """The model-wide capture state: statistics buffers, the routing scratch, the switch.

    Buffers are non-persistent (never in a state dict) and created on the model's device
    at construction, so the compiled graph and CUDA graphs capture their addresses once,
    and vLLM's memory profiling counts them with the model. The largest is the routing
    scratch: ``(max_tokens + count_batch_tokens) x MoE layers x 3 top_k`` float32 (for
    example 0.8 MiB on the testbed at 8192 tokens, 41 MiB for 48 layers, top-8); a pruned
    variant adds the router rows of its pruned experts.

    ``routed[slot]`` is the number of experts MoE layer ``slot`` routes among (its kept
    experts) and ``held[slot]`` how many the checkpoint holds (all of them, except in a
    non-uniform export); both are fixed when the model is built.
    """

    def __init__(
        self,
        shape: MoEShape,
        hidden_size: int,
        max_tokens: int,
        routed: list[int],
        held: list[int],
        sample_capacity: int = 0,
        count_batch_tokens: int = COUNT_BATCH_TOKENS,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.moe_layers = shape.moe_layers
        self.num_experts = num_experts = shape.num_experts
        self.top_k = top_k = shape.top_k
        num_layers = len(shape.moe_layers)
        if not (len(routed) == len(held) == num_layers and all(0 < r <= h <= num_experts for r, h in zip(routed, held))):
            raise ValueError(f"expert counts per MoE layer {routed} (routed) / {held} (held) do not fit {num_experts} experts")
        self.routed, self.held = list(routed), list(held)

        def buffer(name: str, *size: int, dtype: torch.dtype = torch.float32) -> None:
            self.register_buffer(name, torch.zeros(*size, dtype=dtype), persistent=False)

        # Router rows of the experts a layer holds but does not route to (a pruned
        # variant), for their share of the full softmax; none on an unpruned model.
        buffer("dropped_router", num_layers, max(h - r for r, h in zip(routed, held)), hidden_size)
        # The original id of each of a layer's columns: its routed experts (the model's
        # own ids 0..routed-1), then its dropped experts, then the experts it lacks.
        buffer("original_id", num_layers, num_experts, dtype=torch.int64)
        self._renumbered = [False] * num_layers  # read at trace time: identity layers skip the maps
        for slot in range(num_layers):
            self.set_kept(slot, list(range(routed[slot])))
        # Token-major and flat: row ``t * layers + slot`` holds one token's routing in one
        # layer: its top-k gates, original ids and full-softmax probabilities (for sampling).
        # Each layer writes its rows with one ``index_copy_``, which the compiled graph
        # performs in place (a write through a slice view made inductor copy the whole
        # buffer every step). Steps append at ``offset`` until more than count_batch_tokens
        # tokens wait, so the rows of one more step of up to max_tokens always fit.
        self.count_batch_tokens = count_batch_tokens
        # Only where every step is counted at once may a CUDA graph capture count().
        self._graphs = count_batch_tokens == 0 and torch.cuda.is_available()
        buffer("scratch", (max_tokens + count_batch_tokens) * num_layers, 3 * top_k)
        # 1 per waiting token that counts, 0 for padding and for tokens served while off
        buffer("waiting_real", max_tokens + count_batch_tokens)
        # True for padding rows: all False (every row real) until it follows vLLM's own mask.
        buffer("padding", max_tokens, dtype=torch.bool)
        buffer("offset", 1, dtype=torch.int64)  # read and advanced by record() inside the graph
        buffer("appending", 1, dtype=torch.int64)  # 1 while steps wait to be counted together, else 0
        self._waiting = 0  # the offset, in Python
        buffer("active", 1)
        self._on = False  # the same switch, read in Python (see count)
        # Running totals in float64: integer counts stay exact up to 2**53. Traced tokens
        # are not kept apart: every one adds exactly top_k to each layer's counts.
        buffer("totals", num_layers, 2, num_experts, dtype=torch.float64)  # routed, gate
        # Probability sums, flat (``slot * experts + original id``): added to inside the
        # graph at every step, with one ``index_add_`` on the buffer itself, never a view.
        buffer("prob_totals", num_layers * num_experts, dtype=torch.float64)
        buffer("transitions", max(num_layers - 1, 0), num_experts, num_experts, dtype=torch.float64)
        # Sampling ring (unsampled tokens all write the scratch row at index capacity).
        buffer("sample_rate", 1)
        buffer("sample_ids", sample_capacity + 1, num_layers, top_k, dtype=torch.int32)
        buffer("sample_probs", sample_capacity + 1, num_layers, top_k)
        buffer("sample_count", 1, dtype=torch.int64)

    def set_kept(self, slot: int, kept: list[int]) -> None:
        """The original ids MoE layer ``slot`` routes to, in the order of its own expert ids."""
        routed, held = self.routed[slot], self.held[slot]
        if len(kept) != routed or len(set(kept)) != routed or not all(0 <= e < held for e in kept):
            raise ValueError(f"MoE layer slot {slot} routes to {routed} of {held} held experts, not {kept}")
        kept_set = set(kept)
        order = list(kept) + [e for e in range(held) if e not in kept_set] + list(range(held, self.num_experts))
        self.original_id[slot] = torch.tensor(order)
        self._renumbered[slot] = order != list(range(self.num_experts))

    def follow_padding_mask(self, is_padding: torch.Tensor | None) -> None:
        """Make the ``padding`` buffer a view of vLLM's padding mask, which the graph then reads.

        vLLM's model runner keeps the mask in one persistent buffer, rewrites its first rows
        before every forward pass and hands the model a slice of it from the start (the
        forward context's ``is_padding``). The buffer keeps its shape and its place in the
        model, only its storage becomes the runner's, so the compiled graph, and a CUDA
        graph captured later, read each step's mask with no operation of their own. Called
        at the first forward pass, before vLLM compiles or captures the model. Without a
        mask (``None``) no row is padding.
        """
        if is_padding is None:
            return
        storage = is_padding.untyped_storage()
        fits = storage.nbytes() >= is_padding.storage_offset() + self.padding.numel()
        if is_padding.dtype != torch.bool or is_padding.device != self.padding.device or not (
            is_padding.is_contiguous() and fits
        ):
            raise RuntimeError(
                f"vLLM's padding mask ({is_padding.dtype}, {tuple(is_padding.shape)} on {is_padding.device}) is not "
                f"a view of a persistent bool buffer of at least {self.padding.numel()} tokens on "
                f"{self.padding.device}; routing capture cannot tell padding rows from real tokens"
            )
        self.padding.set_(storage, is_padding.storage_offset(), self.padding.shape)

    def set_router(self, slot: int, rows: torch.Tensor, kept: list[int]) -> None:
        """Load MoE layer ``slot``'s router: the ``rows`` the checkpoint holds and the ids kept."""
        self.set_kept(slot, kept)
        dropped = self.original_id[slot, self.routed[slot] : self.held[slot]].tolist()
        self.dropped_router[slot, : len(dropped)].copy_(rows[dropped].float())

    def record(
        self, slot: int, hidden: torch.Tensor, logits: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor
    ) -> None:
        """Keep the routing MoE layer ``slot`` just computed for the ``T`` tokens of this pass.

        ``hidden [T, H]`` is the layer's input, ``logits [T, routed]`` its router logits,
        ``gates`` and ``ids`` ``[T, top_k]`` the weights and (the model's own) expert ids
        its router chose. Called inside the router, so it is traced into vLLM's compiled
        graph, where the work fuses into the kernels around it:

        * the probability sum is added at once: the full softmax over every original
          expert, weighted by which tokens count (real, not padding, while recording is
          on), summed over the tokens, once per layer and step;
        * the top-k gates, original ids and their full-softmax probabilities are written at
          the running offset of the scratch, for the counting pass;
        * the last layer keeps each token's weight and advances the offset while steps
          wait to be counted together.

        Python branches depend only on the layer, never on the data.
        """
        num_tokens = logits.shape[0]
        routed, held, num_experts = self.routed[slot], self.held[slot], self.num_experts
        parts = [logits.float()]
        if held > routed:  # the experts this variant dropped, for the full softmax
            parts.append(hidden[:, : self.dropped_router.shape[2]].float() @ self.dropped_router[slot, : held - routed].t())
        if held < num_experts:  # experts the checkpoint lacks
            parts.append(logits.new_full((num_tokens, num_experts - held), float("-inf"), dtype=torch.float32))
        probs = torch.cat(parts, dim=-1).softmax(dim=-1)  # columns in the layer's order (see set_kept)
        weight = self.padding[:num_tokens].logical_not().float() * self.active
        # A sum, not a product with ``weight``: inductor fuses it into the softmax's own loop,
        # where a matrix product would be one more library call per layer and step.
        summed = (probs * weight[:, None]).sum(dim=0, dtype=torch.float64)
        self.prob_totals.index_add_(0, self.original_id[slot] + slot * num_experts, summed)
        chosen = probs.gather(-1, ids.long())  # the layer's own ids are its first columns
        if self._renumbered[slot]:
            ids = self.original_id[slot][ids.long()]
        row = torch.cat([gates.float(), ids.float(), chosen], dim=-1)
        tokens = torch.arange(num_tokens, device=row.device) + self.offset
        self.scratch.index_copy_(0, tokens * len(self.moe_layers) + slot, row)
        if slot == len(self.moe_layers) - 1:  # the step is written: the next one appends after it
            self.waiting_real.index_copy_(0, tokens, weight)
            self.offset.add_(self.appending * num_tokens)

    #: The buffers :meth:`record` writes inside the graph (``padding`` is vLLM's, read only).
    GRAPH_WRITES = ("prob_totals", "scratch", "waiting_real", "offset")

    @contextlib.contextmanager
    def discarding_writes(self) -> Iterator[None]:
        """Undo, on leaving, what forward passes inside the block recorded.

        For running one step twice (see compile_check.py): the second run then records
        the step once, as if the first had not run. The buffers are copied once, whole.
        """
        saved = {name: getattr(self, name).clone() for name in self.GRAPH_WRITES}
        try:
            yield
        finally:
            for name, value in saved.items():
                getattr(self, name).copy_(value)

    @torch.no_grad()
    def count(self, num_tokens: int) -> None:
        """Take in the forward pass that just ran (its first ``num_tokens`` tokens).

        Outside CUDA-graph capture it returns at once while recording is off. The graph
        has already written the step's routing and which of its tokens are real; here the
        waiting tokens are counted (:meth:`flush`) once more than ``count_batch_tokens``
        wait: with 0, at every step, in tensor operations whose shapes depend only on
        ``num_tokens``, so a CUDA graph captures and replays it (weighted by the on/off
        flag when replayed).
        """
        if not (self._on or (self._graphs and capturing_cuda_graph())):
            return  # off, and no graph will replay this step: nothing would be added
        self._waiting += num_tokens  # what the graph added to ``offset``
        if self._waiting > self.count_batch_tokens:
            self.flush()

    def pass_bytes_per_layer(self, num_tokens: int) -> int:
        """Temporaries of a count pass per MoE layer and token: the top-k ids and weights
        (int64, float64), and the ``top_k**2`` transition indices and weights (int64 and float64)."""
        return num_tokens * (16 * self.top_k + 16 * self.top_k**2)

    @torch.no_grad()
    def flush(self) -> None:
        """Count the routing of every waiting token, for all MoE layers at once.

        Counts, gate sums and transitions are sparse: each token adds its weight (1, or 0
        for padding and traffic while recording was off) at its top-k ids, and at its
        ``top_k**2`` pairs of ids in consecutive layers, with ``index_add_`` into the float64
        totals (integer counts stay exact up to 2**53). Temporaries stay under
        ``COUNT_PASS_BYTES``: a large pass is made for as many layers at a time as fit.
        """
        num_tokens, self._waiting = self._waiting, 0
        if num_tokens == 0:
            return
        self.offset.zero_()
        weight = self.waiting_real[:num_tokens]
        sampled = self._sample_rows(weight) if self.sample_capacity else None
        num_layers, num_experts, top_k = len(self.moe_layers), self.num_experts, self.top_k
        rows = self.scratch[: num_tokens * num_layers].view(num_tokens, num_layers, 3 * top_k)
        token_weight = weight.double()
        totals, transitions = self.totals.view(-1), self.transitions.view(-1)
        chunk = max(1, COUNT_PASS_BYTES // self.pass_bytes_per_layer(num_tokens))
        previous: torch.Tensor | None = None  # the ids of the layer before this chunk
        for start in range(0, num_layers, chunk):
            layers = slice(start, min(start + chunk, num_layers))
            # Ids and gates token-minor, [layers, k, T]: the index arithmetic below then runs
            # over long contiguous rows instead of innermost dimensions of k or k*k.
            contiguous = torch.contiguous_format
            gates = rows[:, layers, :top_k].permute(1, 2, 0).to(torch.float64, memory_format=contiguous)
            ids = rows[:, layers, top_k : 2 * top_k].permute(1, 2, 0).to(torch.int64, memory_format=contiguous)
            # totals[slot, 0 | 1, id]: the routed count and gate sum of an expert
            routed_at = ids + torch.arange(layers.start, layers.stop, device=ids.device)[:, None, None] * (2 * num_experts)
            totals.index_add_(0, routed_at.flatten(), token_weight.expand(ids.shape).flatten())
            totals.index_add_(0, (routed_at + num_experts).flatten(), (gates * token_weight).flatten())
            # transitions[slot, a, b]: every (id in layer slot, id in layer slot + 1) of a token
            pairs = ids if previous is None else torch.cat((previous, ids))
            first = start - (previous is not None)
            if pairs.shape[0] > 1:
                pair_at = pairs[:-1, :, None, :] * num_experts + pairs[1:, None, :, :]  # [l, k, k, T]
                pair_at += (torch.arange(first, first + pair_at.shape[0], device=ids.device) * num_experts**2)[
                    :, None, None, None
                ]
                transitions.index_add_(0, pair_at.flatten(), token_weight.expand(pair_at.shape).flatten())
            previous = ids[-1:]
            if sampled is not None:
                self.sample_ids[sampled, layers] = ids.permute(2, 0, 1).to(self.sample_ids.dtype)
                self.sample_probs[sampled, layers] = rows[:, layers, 2 * top_k :]

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
        self.flush()  # tokens recorded while on are counted as on
        self.active.fill_(float(on))
        # Off (or counting every step), every step overwrites the scratch from row 0.
        self.appending.fill_(int(on and self.count_batch_tokens > 0))
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
        self.flush()
        return int(self.totals[0, 0].sum().round()) // self.top_k

    def snapshot(self) -> RoutingStats:
        """The statistics gathered since the last drain (a copy; resets nothing)."""
        tokens = self.traced_tokens  # counts the waiting tokens first
        totals = self.totals.cpu()
        return RoutingStats(
            moe_layers=self.moe_layers,
            top_k=self.top_k,
            tokens=tokens,
            counts=totals[:, 0].round().long(),
            gate_sum=totals[:, 1].clone(),
            prob_sum=self.prob_totals.view(len(self.moe_layers), self.num_experts).cpu().clone(),
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
        for buffer in (self.totals, self.prob_totals, self.transitions):
            buffer.zero_()
        if self.sample_capacity == 0:
            return stats, None
        ids, probs, dropped = self._drain_samples()
        return stats, {"topk_ids": ids.tolist(), "topk_probs": probs.tolist(), "dropped": dropped}
