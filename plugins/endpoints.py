"""HTTP control of routing capture on the vLLM server itself (``vllm.endpoint_plugins``).

Routes (JSON in, JSON out; bad requests get a 400 naming the problem):

* ``POST /moe_prune/trace/start`` ``{"label": "python"}`` (label optional): count traffic;
* ``POST /moe_prune/trace/stop``: stop counting and flush what was counted;
* ``POST /moe_prune/trace/reset``: discard what was counted since the last flush;
* ``POST /moe_prune/trace/dump``: flush now; returns the shard written (if any);
* ``GET /moe_prune/trace/status``: state, counters, tracing health.

A background task flushes every ``MOE_PRUNE_FLUSH_INTERVAL`` seconds into
``MOE_PRUNE_TRACE_DIR`` (see settings.py), so a killed server loses at most one
interval. A flush whose write fails keeps its statistics and retries with the next one.
Endpoint plugins load only when named in ``VLLM_PLUGINS`` (vLLM's rule for HTTP
surface): ``vllm-moe-prune serve-args`` prints the right value.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from argparse import Namespace
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.stats import RoutingStats
from vllm_moe_prune.traces import FULL_VARIANT, Samples, ShardMeta, write_shard

from . import plugin_logger
from .metrics import ServerMetrics
from .offline import samples_from_rpc
from .settings import MetricsSettings, TraceSettings

logger = plugin_logger(__name__)

_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class TraceService:
    """Capture control and periodic flushing for one API server."""

    def __init__(
        self, engine_client: Any, settings: TraceSettings, fingerprint: str, plan: Plan | None, metrics: ServerMetrics
    ) -> None:
        self.engine = engine_client
        self.settings = settings
        self.fingerprint = fingerprint
        self.plan = plan
        self.metrics = metrics
        self.label = settings.label
        self.window_start = time.time()
        self.pending: RoutingStats | None = None
        self.pending_samples: list[Samples] = []
        self.tokens_traced = 0
        self.shards_written = 0
        self.shards_failed = 0
        self.last_shard: str | None = None
        self._lock = asyncio.Lock()

    async def _rpc(self, method: str, *args: Any) -> Any:
        # Tensor-parallel workers route identically; the first one speaks for the engine.
        return (await self.engine.collective_rpc(method, args=args))[0]

    async def start(self, label: str | None = None) -> None:
        async with self._lock:
            if label is not None and label != self.label:
                await self._flush_locked()
                self.label = label
            # The on/off switch lives in the engine, shared by every API server: only a
            # switch from off to on discards what was buffered before it.
            if not (await self._rpc("moe_prune_status"))["active"]:
                await self._flush_locked(write=False)
                await self._rpc("moe_prune_set_active", True)
                self.window_start = time.time()

    async def stop(self) -> str | None:
        async with self._lock:
            await self._rpc("moe_prune_set_active", False)
            return await self._flush_locked()

    async def reset(self) -> None:
        async with self._lock:
            await self._rpc("moe_prune_drain")
            self.pending = None
            self.pending_samples = []
            self.window_start = time.time()

    async def flush(self) -> str | None:
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self, write: bool = True) -> str | None:
        raw = await self._rpc("moe_prune_drain")
        if not write:
            return None
        drained = RoutingStats.from_dict(raw["stats"])
        self.tokens_traced += drained.tokens
        self.pending = drained if self.pending is None else self.pending + drained
        samples = samples_from_rpc(raw["samples"])
        if samples is not None:
            self.pending_samples.append(samples)
        if self.settings.trace_dir is None or self.pending.tokens == 0:
            return None
        end = time.time()
        meta = ShardMeta(
            fingerprint=self.fingerprint, start=self.window_start, end=end, label=self.label,
            variant=self.plan.plan_id if self.plan else FULL_VARIANT, kept=self.plan.kept if self.plan else None,
        )
        samples = None
        if self.pending_samples:
            samples = Samples(
                topk_ids=torch.cat([s.topk_ids for s in self.pending_samples]),
                topk_probs=torch.cat([s.topk_probs for s in self.pending_samples]),
            )
        try:
            path = await asyncio.to_thread(write_shard, self.settings.trace_dir, self.pending, meta, samples)
        except Exception:
            self.shards_failed += 1
            self.metrics.shard_failed()
            logger.exception("moe_prune: writing a trace shard failed; its statistics are kept for the next flush")
            return None
        self.pending = None
        self.pending_samples = []
        self.window_start = end
        self.shards_written += 1
        self.metrics.shard_written()
        self.last_shard = str(path)
        return self.last_shard

    async def status(self) -> dict[str, Any]:
        worker = await self._rpc("moe_prune_status")
        return {
            "active": worker["active"],
            "label": self.label,
            "trace_dir": self.settings.trace_dir,
            "flush_interval_s": self.settings.flush_interval,
            "tokens_traced": self.tokens_traced + int(worker["tokens"]),
            "tokens_unflushed": int(worker["tokens"]) + (self.pending.tokens if self.pending else 0),
            "shards_written": self.shards_written,
            "shards_failed": self.shards_failed,
            "last_shard": self.last_shard,
            "buffer_bytes": worker["buffer_bytes"],
            "variant": self.plan.plan_id if self.plan else FULL_VARIANT,
            "experts_per_layer": worker["experts_per_layer"],
            "compile_check": worker["compile_check"],
        }

    async def run_periodic_flush(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            try:
                await self.flush()
            except Exception:
                logger.exception("moe_prune: periodic flush failed")


def _plan_of(args: Namespace) -> Plan | None:
    extra = getattr(args, "model_loader_extra_config", None) or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    return Plan.load(extra["plan"]) if extra.get("plan") else None


async def _json_body(request: Request, allowed: set[str]) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    return body


class HTTPError(Exception):
    """A refusal with its HTTP status, raised by a route handler."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class MoePruneEndpoints:
    """The ``vllm.endpoint_plugins`` entry: routes plus the per-server trace service."""

    name = "moe_prune_endpoints"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        def route(method: str, path: str, fields: set[str] = frozenset()):
            """Register ``handler(svc, body)``; bad requests and a missing service become a 400."""

            def register(handler: Callable[[TraceService, dict[str, Any]], Awaitable[Any]]) -> None:
                async def endpoint(request: Request) -> JSONResponse:
                    svc = getattr(request.app.state, "moe_prune", None)
                    if svc is None:
                        return _error(400, "this server does not serve a model of the moe_prune plugin")
                    try:
                        body = await _json_body(request, set(fields))
                        return JSONResponse(await handler(svc, body))
                    except HTTPError as exc:
                        return _error(exc.status, str(exc))
                    except ValueError as exc:
                        return _error(400, str(exc))

                app.add_api_route(path, endpoint, methods=[method], name=f"moe_prune_{handler.__name__}")

            return register

        @route("POST", "/moe_prune/trace/start", {"label"})
        async def start(svc: TraceService, body: dict[str, Any]) -> dict[str, Any]:
            label = body.get("label")
            if label is not None and (not isinstance(label, str) or not _LABEL.match(label)):
                raise ValueError("label must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")
            await svc.start(label)
            return {"active": True, "label": svc.label}

        @route("POST", "/moe_prune/trace/stop")
        async def stop(svc: TraceService, body: dict[str, Any]) -> dict[str, Any]:
            return {"active": False, "shard": await svc.stop()}

        @route("POST", "/moe_prune/trace/reset")
        async def reset(svc: TraceService, body: dict[str, Any]) -> dict[str, Any]:
            await svc.reset()
            return {"reset": True}

        @route("POST", "/moe_prune/trace/dump")
        async def dump(svc: TraceService, body: dict[str, Any]) -> dict[str, Any]:
            if svc.settings.trace_dir is None:
                raise HTTPError(409, "no trace directory: start the server with MOE_PRUNE_TRACE_DIR set")
            return {"shard": await svc.flush()}

        @route("GET", "/moe_prune/trace/status")
        async def status(svc: TraceService, body: dict[str, Any]) -> dict[str, Any]:
            return await svc.status()

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        settings = TraceSettings.from_env()
        if settings.trace_dir is not None:
            Path(settings.trace_dir).mkdir(parents=True, exist_ok=True)
        ckpt, plan = Checkpoint.open(args.model), _plan_of(args)
        metrics = ServerMetrics(engine_client, ckpt, plan, MetricsSettings.from_env())
        svc = TraceService(engine_client, settings, ckpt.fingerprint, plan, metrics)
        state.moe_prune = svc
        # With several API servers (--api-server-count) one engine serves them all: the
        # first switches tracing on and flushes periodically; any of them answers HTTP.
        if metrics.leader:
            if settings.on_boot:
                await svc.start()
            # Keep a reference: the event loop holds tasks only weakly.
            svc.flush_task = asyncio.create_task(svc.run_periodic_flush())
        await metrics.start()
        logger.info("moe_prune: tracing %s, flushing every %.0f s into %s",
                    "on" if settings.on_boot else "off", settings.flush_interval, settings.trace_dir)
