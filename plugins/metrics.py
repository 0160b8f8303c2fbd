"""The plugin's Prometheus series on the vLLM server's own ``/metrics``: every one is defined here.

Names carry the project's prefix ``moe_prune_`` (vLLM unregisters any ``vllm:`` series it
did not create), values are in base units, counters end in ``_total``. Every series has
the labels ``model_name`` (as on vLLM's own series, so the two can be joined) and
``variant`` (the plan id, ``full`` for the unpruned model), so that the variants served by
several servers can be compared in one Prometheus.

Where the values come from, and why there:

* Series live only in API server processes, because ``/metrics`` is served from there:
  from the default registry in single-process mode, and, with ``--api-server-count`` > 1,
  from the files in ``PROMETHEUS_MULTIPROC_DIR``, which vLLM creates before it spawns the
  API servers, so these series are file-backed there with no step by the user. Workers
  create none (in single-process mode their values would never reach ``/metrics``).
* Engine-wide values (variant, weight bytes, kept experts, routing) are published by ONE
  API server, API process rank 0 (the only one in single-process mode). Routing counters
  advance by the growth of the worker's cumulative ``moe_prune_peek`` between two
  refreshes: the peek adds every batch ever drained to the undrained buffers, so trace
  flushes (which drain and reset, from any API server, at any time) and metrics never
  count a token twice or lose one. Traffic discarded by ``POST /moe_prune/trace/reset``
  was still served, so it stays counted here (the shards then hold less).
* Each API server counts the trace shards it writes or fails to write; Prometheus'
  multiprocess collector sums counters and histograms over processes.
* Latency comes from :class:`VariantLatencyLogger`, a ``vllm.stat_logger_plugins`` entry
  built in every API server, which sees the same per-request timings as vLLM's own
  histograms.

Routing series need tracing on (``MOE_PRUNE_TRACE_ON_BOOT=1`` or ``POST
/moe_prune/trace/start``): capture counts nothing while tracing is off, so coverage then
stops advancing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram
from vllm.config import VllmConfig
from vllm.v1.metrics.buckets import histogram_buckets
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.plan import Plan, predicted_bytes
from vllm_moe_prune.serving import CONFIG_PLAN_KEY
from vllm_moe_prune.traces import FULL_VARIANT

from . import plugin_logger
from .settings import MetricsSettings

logger = plugin_logger(__name__)

VARIANT_LABELS = ("model_name", "variant")
LAYER_LABELS = (*VARIANT_LABELS, "layer")
EXPERT_LABELS = (*LAYER_LABELS, "expert")
#: Engine-wide gauges are written by one API server; in multi-process mode the most
#: recent write is the value (vLLM's own choice for its gauges).
_GAUGE_MODE = "mostrecent"


def variant_labels(vllm_config: VllmConfig) -> dict[str, str]:
    """``model_name`` and ``variant`` of the engine, the same in every series and process.

    The plan id is read from the config override the plugin's flags set (the loader
    refuses to start when it differs from the plan's), so the stat logger, which sees
    only the engine config, labels latency exactly like the routing series.
    """
    model_config = vllm_config.model_config
    return {
        "model_name": str(model_config.served_model_name),
        "variant": str(getattr(model_config.hf_config, CONFIG_PLAN_KEY, None) or FULL_VARIANT),
    }


class RoutingSeries:
    """Variant, memory, coverage and tracing-health series (one set per process)."""

    def __init__(self) -> None:
        self.variant_info = Gauge(
            "moe_prune_variant_info",
            "Variant served by this engine (value 1): pruning method, budget and model fingerprint.",
            [*VARIANT_LABELS, "method", "budget", "fingerprint"], multiprocess_mode=_GAUGE_MODE,
        )
        self.weight_bytes = Gauge(
            "moe_prune_weight_bytes",
            "Bytes of checkpoint weights the variant loaded (the checkpoint less its pruned routed experts).",
            VARIANT_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.routed_expert_bytes = Gauge(
            "moe_prune_routed_expert_bytes",
            "Bytes of routed-expert weights resident in the engine, summed over its workers.",
            VARIANT_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.routed_expert_pruned_bytes = Gauge(
            "moe_prune_routed_expert_pruned_bytes",
            "Bytes of routed-expert weights in the checkpoint that the variant prunes (never read).",
            VARIANT_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.kept_experts = Gauge(
            "moe_prune_kept_experts", "Routed experts the variant keeps in this MoE layer.",
            LAYER_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.prob_mass = Counter(
            "moe_prune_router_prob_mass",
            "Full-softmax router probability mass of the traced tokens over all original experts "
            "(one per token and layer).",
            LAYER_LABELS,
        )
        self.prob_mass_kept = Counter(
            "moe_prune_router_prob_mass_kept",
            "Part of moe_prune_router_prob_mass that falls on the experts the variant keeps.",
            LAYER_LABELS,
        )
        self.coverage = Gauge(
            "moe_prune_coverage_ratio",
            "Share of the traced traffic's router probability mass on kept experts since the server "
            "started (1 for the full model); use rate() of the two mass counters for a window.",
            LAYER_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.tokens_traced = Counter("moe_prune_tokens_traced", "Tokens whose routing was traced.", VARIANT_LABELS)
        self.tracing_active = Gauge(
            "moe_prune_tracing_active", "1 while routing capture is on (routing series advance only then).",
            VARIANT_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.trace_buffer_bytes = Gauge(
            "moe_prune_trace_buffer_bytes", "Bytes of the capture buffers held by the engine (first worker).",
            VARIANT_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.eager_fallback = Gauge(
            "moe_prune_eager_fallback",
            "1 when the compiled model computed something else than the eager model at its first served "
            "step, so the engine serves eagerly (correct, slower; see the server log for the remedy).",
            VARIANT_LABELS, multiprocess_mode=_GAUGE_MODE,
        )
        self.shards_written = Counter("moe_prune_trace_shards_written", "Trace shards written.", VARIANT_LABELS)
        self.shards_failed = Counter(
            "moe_prune_trace_shards_failed", "Trace shard writes that failed (statistics kept for the next flush).",
            VARIANT_LABELS,
        )


class ExpertSeries:
    """Per-expert series: layers x experts of them, so only created when asked for."""

    def __init__(self) -> None:
        self.routed_tokens = Counter(
            "moe_prune_expert_routed_tokens", "Top-k routings of traced tokens to this original expert.",
            EXPERT_LABELS,
        )
        self.prob_mass = Counter(
            "moe_prune_expert_router_prob_mass",
            "Full-softmax router probability mass of traced tokens on this original expert (kept or pruned).",
            EXPERT_LABELS,
        )


class LatencySeries:
    """vLLM's TTFT, inter-token and end-to-end histograms with its buckets, plus the variant label."""

    def __init__(self, bucket_overrides: Mapping[str, list[float]] | None) -> None:
        labels = (*VARIANT_LABELS, "engine")
        self.ttft = Histogram(
            "moe_prune_time_to_first_token_seconds",
            "Time to first token per variant (as vllm:time_to_first_token_seconds).",
            labels, buckets=histogram_buckets("time_to_first_token", overrides=bucket_overrides),
        )
        self.itl = Histogram(
            "moe_prune_inter_token_latency_seconds",
            "Inter-token latency per variant (as vllm:inter_token_latency_seconds).",
            labels, buckets=histogram_buckets("inter_token_latency", overrides=bucket_overrides),
        )
        self.e2e = Histogram(
            "moe_prune_e2e_request_latency_seconds",
            "End-to-end request latency per variant (as vllm:e2e_request_latency_seconds).",
            labels, buckets=histogram_buckets("request_latency", overrides=bucket_overrides),
        )


# A Prometheus series can be registered once per process, but vLLM may build several
# stat loggers and the endpoint plugin's state more than once: create each set once.
routing_series = functools.cache(RoutingSeries)
expert_series = functools.cache(ExpertSeries)
_latency: LatencySeries | None = None


def latency_series(vllm_config: VllmConfig) -> LatencySeries:
    """The latency histograms, with the bucket overrides of the first engine of the process."""
    global _latency
    if _latency is None:
        _latency = LatencySeries(vllm_config.observability_config.custom_histogram_buckets)
    return _latency


class VariantLatencyLogger(StatLoggerBase):
    """``vllm.stat_logger_plugins`` entry: request latency labelled with the variant.

    vLLM's histograms carry only ``model_name`` and ``engine``; servers of different
    variants of one model are then told apart only by scrape target. These carry the
    variant too, with vLLM's buckets, so quantiles compare directly across variants.
    """

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        series = latency_series(vllm_config)
        labels = {**variant_labels(vllm_config), "engine": str(engine_index)}
        self.ttft = series.ttft.labels(**labels)
        self.itl = series.itl.labels(**labels)
        self.e2e = series.e2e.labels(**labels)

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        if iteration_stats is None:
            return
        for ttft in iteration_stats.time_to_first_tokens_iter:
            self.ttft.observe(ttft)
        for itl in iteration_stats.inter_token_latencies_iter:
            self.itl.observe(itl)
        for finished in iteration_stats.finished_requests:
            self.e2e.observe(finished.e2e_latency)

    def log_engine_initialized(self) -> None:
        """Nothing to log: the histograms are complete from their first observation."""


@dataclass
class _Peek:
    """Cumulative routing totals of one ``moe_prune_peek``."""

    tokens: int
    counts: torch.Tensor
    prob_sum: torch.Tensor

    @classmethod
    def from_rpc(cls, raw: dict[str, Any]) -> "_Peek":
        return cls(
            raw["tokens"],
            torch.tensor(raw["counts"], dtype=torch.int64),
            torch.tensor(raw["prob_sum"], dtype=torch.float64),
        )


class ServerMetrics:
    """The plugin's series as one API server publishes them (see the module docstring)."""

    def __init__(self, engine_client: Any, ckpt: Checkpoint, plan: Plan | None, settings: MetricsSettings) -> None:
        vllm_config = engine_client.vllm_config
        self.engine = engine_client
        self.ckpt = ckpt
        self.plan = plan
        self.settings = settings
        self.labels = variant_labels(vllm_config)
        self.leader = vllm_config.parallel_config._api_process_rank == 0
        self.series = routing_series()
        self._shards_written = self.series.shards_written.labels(**self.labels)
        self._shards_failed = self.series.shards_failed.labels(**self.labels)
        shape = ckpt.shape
        self.kept = plan.kept if plan else ckpt.experts
        self.kept_mask = torch.zeros(len(shape.moe_layers), shape.num_experts, dtype=torch.bool)
        for i, layer in enumerate(shape.moe_layers):
            self.kept_mask[i, self.kept[layer]] = True
        self._seen = _Peek(0, torch.zeros_like(self.kept_mask, dtype=torch.int64),
                           torch.zeros_like(self.kept_mask, dtype=torch.float64))
        self._refresh_task: asyncio.Task | None = None

    def shard_written(self) -> None:
        self._shards_written.inc()

    def shard_failed(self) -> None:
        self._shards_failed.inc()

    async def start(self) -> None:
        """Publish the engine's series and keep the routing ones fresh (rank-0 API server only)."""
        if not self.leader:
            return
        await self._publish_variant()
        await self.refresh()
        # Keep a reference: the event loop holds tasks only weakly.
        self._refresh_task = asyncio.create_task(self._refresh_periodically())

    async def _publish_variant(self) -> None:
        statuses = await self.engine.collective_rpc("moe_prune_status")
        first = statuses[0]
        series, labels = self.series, self.labels
        plan = self.plan
        series.variant_info.labels(
            **labels,
            method=plan.method if plan else "none",
            budget=str(plan.params.get("budget", "none")) if plan else "none",
            fingerprint=self.ckpt.fingerprint,
        ).set(1)
        # The stock loader (tracing a full model without --load-format moe_prune) counts nothing.
        if "bytes_read" in first["load_info"]:
            series.weight_bytes.labels(**labels).set(first["load_info"]["bytes_read"])
        series.routed_expert_bytes.labels(**labels).set(sum(s["expert_bytes_resident"] for s in statuses))
        series.routed_expert_pruned_bytes.labels(**labels).set(
            predicted_bytes(self.ckpt, self.kept)["routed_expert_bytes_pruned"]
        )
        for layer, count in first["experts_per_layer"].items():
            series.kept_experts.labels(**labels, layer=layer).set(count)
        series.trace_buffer_bytes.labels(**labels).set(first["buffer_bytes"])

    async def refresh(self) -> None:
        """Advance the routing counters by what the engine traced since the last refresh."""
        raw = (await self.engine.collective_rpc("moe_prune_peek"))[0]
        now, seen = _Peek.from_rpc(raw), self._seen
        series, labels = self.series, self.labels
        series.tracing_active.labels(**labels).set(int(raw["active"]))
        series.eager_fallback.labels(**labels).set(int(raw["eager_fallback"]))
        series.tokens_traced.labels(**labels).inc(now.tokens - seen.tokens)
        mass, seen_mass = now.prob_sum.sum(dim=1), seen.prob_sum.sum(dim=1)
        kept, seen_kept = (now.prob_sum * self.kept_mask).sum(dim=1), (seen.prob_sum * self.kept_mask).sum(dim=1)
        for i, layer in enumerate(self.ckpt.shape.moe_layers):
            layer_labels = {**labels, "layer": str(layer)}
            series.prob_mass.labels(**layer_labels).inc(float(mass[i] - seen_mass[i]))
            series.prob_mass_kept.labels(**layer_labels).inc(float(kept[i] - seen_kept[i]))
            if mass[i] > 0:
                series.coverage.labels(**layer_labels).set(float(kept[i] / mass[i]))
        if self.settings.per_expert:
            self._refresh_experts(now, seen)
        self._seen = now

    def _refresh_experts(self, now: _Peek, seen: _Peek) -> None:
        experts = expert_series()
        counts, mass = now.counts - seen.counts, now.prob_sum - seen.prob_sum
        for i, layer in enumerate(self.ckpt.shape.moe_layers):
            for expert in range(counts.shape[1]):
                expert_labels = {**self.labels, "layer": str(layer), "expert": str(expert)}
                experts.routed_tokens.labels(**expert_labels).inc(int(counts[i, expert]))
                experts.prob_mass.labels(**expert_labels).inc(float(mass[i, expert]))

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                await self.refresh()
            except Exception:
                logger.exception("moe_prune: refreshing the routing metrics failed")
