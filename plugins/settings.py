"""The plugin's server-side settings, read from ``MOE_PRUNE_*`` environment variables.

One module reads them, so every setting is documented here and nowhere else. They are
not named ``VLLM_*``: vLLM warns about every ``VLLM_*`` variable it does not define, and
refuses to start on one when it validates its environment strictly.

* ``MOE_PRUNE_TRACE_DIR``: directory the server flushes trace shards into
  (unset: tracing can still be started, and dumped over HTTP, but nothing is flushed);
* ``MOE_PRUNE_TRACE_ON_BOOT``: ``1`` to start tracing as soon as the server is up
  (after vLLM's warm-up, which is never counted);
* ``MOE_PRUNE_FLUSH_INTERVAL``: seconds between periodic flushes (default 60); a
  killed server loses at most this much traffic;
* ``MOE_PRUNE_TRACE_LABEL``: traffic label stored in every shard (default "default");
* ``MOE_PRUNE_SAMPLE_CAPACITY``: per-token samples held between two flushes (default
  0: sampling off; the buffer is allocated at start-up, so it is fixed for the server's life);
* ``MOE_PRUNE_SAMPLE_RATE``: share of traced tokens sampled (default 0.01 when a
  capacity is set);
* ``MOE_PRUNE_METRICS_INTERVAL``: seconds between refreshes of the routing series on
  ``/metrics`` (default 10; each refresh is one small RPC to the engine);
* ``MOE_PRUNE_METRICS_PER_EXPERT``: ``1`` to also export per-expert series (layers x
  experts of them; off by default, like upstream vLLM keeps per-expert detail opt-in for
  cardinality);
* ``MOE_PRUNE_INDUCTOR_REORDER``: ``0`` to turn off inductor's peak-memory reordering in
  the graph vLLM compiles (default 1: on, as in stock vLLM); the remedy the engine names
  when its compiled model fails the check of compile_check.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingsError(ValueError):
    """A ``MOE_PRUNE_*`` variable has a value the plugin cannot use."""


def _flag(name: str, default: str = "0") -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value not in {"0", "1", "true", "false", "yes", "no", ""}:
        raise SettingsError(f"{name}={value!r}: use 1 or 0")
    return value in {"1", "true", "yes"}


def _seconds(name: str, default: str) -> float:
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


@dataclass(frozen=True)
class TraceSettings:
    trace_dir: str | None
    on_boot: bool
    flush_interval: float
    label: str

    @classmethod
    def from_env(cls) -> "TraceSettings":
        return cls(
            trace_dir=os.environ.get("MOE_PRUNE_TRACE_DIR") or None,
            on_boot=_flag("MOE_PRUNE_TRACE_ON_BOOT"),
            flush_interval=_seconds("MOE_PRUNE_FLUSH_INTERVAL", "60"),
            label=os.environ.get("MOE_PRUNE_TRACE_LABEL", "default") or "default",
        )


@dataclass(frozen=True)
class SampleSettings:
    capacity: int
    rate: float

    @classmethod
    def from_env(cls) -> "SampleSettings":
        raw_capacity = os.environ.get("MOE_PRUNE_SAMPLE_CAPACITY", "0")
        raw_rate = os.environ.get("MOE_PRUNE_SAMPLE_RATE", "0.01")
        try:
            capacity, rate = int(raw_capacity), float(raw_rate)
        except ValueError:
            raise SettingsError(
                f"MOE_PRUNE_SAMPLE_CAPACITY={raw_capacity!r} / MOE_PRUNE_SAMPLE_RATE={raw_rate!r}: "
                "expected an integer and a number"
            ) from None
        if capacity < 0 or not 0.0 <= rate <= 1.0:
            raise SettingsError("MOE_PRUNE_SAMPLE_CAPACITY must be >= 0 and MOE_PRUNE_SAMPLE_RATE in [0, 1]")
        return cls(capacity, rate if capacity else 0.0)


@dataclass(frozen=True)
class MetricsSettings:
    refresh_interval: float
    per_expert: bool

    @classmethod
    def from_env(cls) -> "MetricsSettings":
        return cls(
            refresh_interval=_seconds("MOE_PRUNE_METRICS_INTERVAL", "10"),
            per_expert=_flag("MOE_PRUNE_METRICS_PER_EXPERT"),
        )


@dataclass(frozen=True)
class CompileSettings:
    reorder_for_peak_memory: bool

    @classmethod
    def from_env(cls) -> "CompileSettings":
        return cls(reorder_for_peak_memory=_flag("MOE_PRUNE_INDUCTOR_REORDER", "1"))
