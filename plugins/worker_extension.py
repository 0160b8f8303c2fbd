"""Methods vLLM adds to every worker (``--worker-extension-cls``), reached by ``collective_rpc``.

They are the only way into the capture buffers of a running engine: the HTTP endpoints,
the ``/metrics`` series (metrics.py) and the offline ``trace`` command call them. Results
are plain dicts of tensors and numbers so that they cross vLLM's process boundary with
its own serialiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_moe_prune.stats import RoutingStats

from .compile_check import FAILED


def expert_weight_bytes(block: torch.nn.Module) -> int:
    """Bytes of routed-expert weights a MoE block holds on this worker (w13 and w2)."""
    return sum(
        p.numel() * p.element_size()
        for name, p in block.named_parameters()
        if name.endswith(("w13_weight", "w2_weight"))
    )


@dataclass
class DrainedTotals:
    """Sum of every batch drained from this worker since it started.

    Drains reset the capture buffers (trace flushes, from any API server); keeping their
    sum here lets :meth:`MoePruneWorkerExtension.moe_prune_peek` report cumulative,
    monotonic totals that no drain disturbs. Transitions are left out: metrics never read
    them, and they are the one ``[L, E, E]`` tensor.
    """

    tokens: int
    counts: torch.Tensor
    prob_sum: torch.Tensor

    def add(self, stats: RoutingStats) -> None:
        self.tokens += stats.tokens
        self.counts += stats.counts
        self.prob_sum += stats.prob_sum


class MoePruneWorkerExtension:
    def _moe_prune_model(self):
        model = self.model_runner.get_model()
        if not hasattr(model, "moe_prune_recorder"):
            raise RuntimeError(
                "this engine's model has no routing capture: serve it with the flags of `vllm-moe-prune serve-args`"
            )
        return model

    def moe_prune_set_active(self, on: bool) -> bool:
        self._moe_prune_model().moe_prune_recorder.set_active(on)
        return on

    def moe_prune_drain(self) -> dict[str, Any]:
        """Statistics and samples since the last drain, in original expert ids; zeroes them.

        ``samples`` is None without a sample capacity, else ``{"topk_ids", "topk_probs",
        "dropped"}`` (oldest first; ``dropped`` counts samples the full ring overwrote).
        """
        model = self._moe_prune_model()
        totals = self._moe_prune_totals()
        stats, samples = model.moe_prune_recorder.drain()
        totals.add(stats)
        return {"stats": stats.to_dict(), "samples": samples, "load_info": getattr(model, "moe_prune_load_info", {})}

    def _moe_prune_totals(self) -> DrainedTotals:
        totals = getattr(self, "_moe_prune_drained", None)
        if totals is None:
            shape = self._moe_prune_model().moe_prune_shape
            zeros = RoutingStats.zeros(shape.moe_layers, shape.num_experts, shape.top_k)
            totals = DrainedTotals(0, zeros.counts, zeros.prob_sum)
            self._moe_prune_drained = totals
        return totals

    @torch.no_grad()
    def moe_prune_peek(self) -> dict[str, Any]:
        """Routing traced since the engine started (every drain plus the buffers); resets nothing.

        The values only grow, whoever drains in between, so the metrics reader turns the
        difference between two peeks into counter increments: no token is counted twice
        or lost, and trace flushes keep their own drain cycle. ``counts`` and
        ``prob_sum`` are ``[moe layer][original expert]`` lists.
        """
        model = self._moe_prune_model()
        recorder = model.moe_prune_recorder
        totals = self._moe_prune_totals()
        pending = recorder.snapshot()
        return {
            "active": bool(recorder.active.item()),
            "eager_fallback": model.moe_prune_compile_check.state == FAILED,
            "tokens": totals.tokens + pending.tokens,
            "counts": (totals.counts + pending.counts).tolist(),
            "prob_sum": (totals.prob_sum + pending.prob_sum).tolist(),
        }

    def moe_prune_set_sample_rate(self, rate: float) -> float:
        self._moe_prune_model().moe_prune_recorder.set_sample_rate(rate)
        return rate

    def moe_prune_status(self) -> dict[str, Any]:
        model = self._moe_prune_model()
        recorder = model.moe_prune_recorder
        resident = {layer: expert_weight_bytes(block) for layer, block in model.moe_prune_blocks()}
        return {
            "expert_bytes_resident": sum(resident.values()),
            "expert_bytes_resident_per_layer": {str(k): v for k, v in resident.items()},
            "active": bool(recorder.active.item()),
            "tokens": recorder.traced_tokens,
            "buffer_bytes": sum(b.numel() * b.element_size() for b in recorder.buffers()),
            "experts_per_layer": {str(k): v for k, v in model.moe_prune_counts.items()},
            "load_info": getattr(model, "moe_prune_load_info", {}),
            "compile_check": model.moe_prune_compile_check.as_dict(),
        }
