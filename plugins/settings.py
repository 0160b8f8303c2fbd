"""The plugin's server-side settings, read from ``VLLM_MOE_PRUNE_*`` environment variables.

One module reads them, so every setting is documented here and nowhere else:

* ``VLLM_MOE_PRUNE_TRACE_DIR``: directory the server flushes trace shards into
  (unset: tracing can still be started, and dumped over HTTP, but nothing is flushed);
* ``VLLM_MOE_PRUNE_TRACE_ON_BOOT``: ``1`` to start tracing as soon as the server is up
  (after vLLM's warm-up, which is never counted);
* ``VLLM_MOE_PRUNE_FLUSH_INTERVAL``: seconds between periodic flushes (default 60); a
  killed server loses at most this much traffic;
* ``VLLM_MOE_PRUNE_TRACE_LABEL``: traffic label stored in every shard (default "default").
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingsError(ValueError):
    """A ``VLLM_MOE_PRUNE_*`` variable has a value the plugin cannot use."""


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in {"0", "1", "true", "false", "yes", "no", ""}:
        raise SettingsError(f"{name}={value!r}: use 1 or 0")
    return value in {"1", "true", "yes"}


@dataclass(frozen=True)
class TraceSettings:
    trace_dir: str | None
    on_boot: bool
    flush_interval: float
    label: str

    @classmethod
    def from_env(cls) -> "TraceSettings":
        raw = os.environ.get("VLLM_MOE_PRUNE_FLUSH_INTERVAL", "60")
        try:
            interval = float(raw)
        except ValueError:
            raise SettingsError(f"VLLM_MOE_PRUNE_FLUSH_INTERVAL={raw!r} is not a number of seconds") from None
        if not interval > 0:
            raise SettingsError(f"VLLM_MOE_PRUNE_FLUSH_INTERVAL={raw!r} must be positive")
        return cls(
            trace_dir=os.environ.get("VLLM_MOE_PRUNE_TRACE_DIR") or None,
            on_boot=_flag("VLLM_MOE_PRUNE_TRACE_ON_BOOT"),
            flush_interval=interval,
            label=os.environ.get("VLLM_MOE_PRUNE_TRACE_LABEL", "default") or "default",
        )
