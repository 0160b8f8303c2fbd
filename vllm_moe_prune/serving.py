"""The vLLM engine arguments that serve a model with this plugin: one source of truth.

``vllm-moe-prune serve-args`` prints them for ``vllm serve``, the ``trace`` command and
the tests pass them to ``vllm.LLM``. Without a plan they serve the full model with
routing capture; with a plan, the pruned variant straight from the original checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.plan import Plan

LOAD_FORMAT = "moe_prune"
WORKER_EXTENSION = "vllm_moe_prune_plugins.worker_extension.MoePruneWorkerExtension"
#: Config keys the plugin's model classes read (they enter vLLM's config hash, so a
#: compiled graph of one plan is never reused for another).
CONFIG_COUNTS_KEY = "moe_prune_experts_per_layer"
CONFIG_PLAN_KEY = "moe_prune_plan_id"
#: vLLM loads HTTP endpoint plugins only when ``VLLM_PLUGINS`` names them, and then
#: loads no unnamed plugin at all: the server needs all of ours named (model classes and
#: loader, HTTP endpoints, the per-variant latency stat logger).
SERVER_ENV = {"VLLM_PLUGINS": "moe_prune,moe_prune_endpoints,moe_prune_metrics"}


def engine_args(model: str | Path, plan_path: str | Path | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs`` (validated: fail early)."""
    ckpt = Checkpoint.open(model)
    overrides: dict[str, Any] = {"architectures": [ckpt.shape.family.pruned_architecture]}
    extra: dict[str, Any] = {}
    if plan_path is not None:
        plan = Plan.load(plan_path)
        plan.validate_for(ckpt)
        overrides[CONFIG_COUNTS_KEY] = {str(k): v for k, v in plan.experts_per_layer.items()}
        overrides[CONFIG_PLAN_KEY] = plan.plan_id
        extra["plan"] = str(Path(plan_path).resolve())
    return {
        "model": str(Path(model).resolve()),
        "hf_overrides": overrides,
        "load_format": LOAD_FORMAT,
        "model_loader_extra_config": extra,
        "worker_extension_cls": WORKER_EXTENSION,
    }
