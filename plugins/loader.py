"""``--load-format moe_prune``: serve a pruned variant straight from the original checkpoint.

The loader reads the plan named in ``--model-loader-extra-config '{"plan": ...}'``,
checks it against the checkpoint and the engine configuration BEFORE any weight is
allocated (fail closed), and then reads from the safetensors files only the tensors the
variant keeps: the tensors of pruned experts are never read from disk. The model class
(models.py) renumbers kept experts and slices the router rows as the tensors arrive.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Generator

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.platforms import current_platform

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.remap import read_kept_tensors
from vllm_moe_prune.serving import CONFIG_COUNTS_KEY, CONFIG_PLAN_KEY, LOAD_FORMAT

from . import plugin_logger
from .models import BINDINGS, KEPT_TENSOR_PREFIX

logger = plugin_logger(__name__)


class MoePruneConfigError(UserError):
    """The engine configuration does not match the plan or the plugin's limits."""


def _rope_type(config: dict) -> str:
    """The rope variant of a config, written either way transformers has written it."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key) or {}
        kind = value.get("rope_type") or value.get("type")
        if kind:
            return str(kind)
    return "default"


@register_model_loader(LOAD_FORMAT)
class MoePruneModelLoader(DefaultModelLoader):
    """Default safetensors loading, restricted to the experts a plan keeps."""

    def __init__(self, load_config: LoadConfig) -> None:
        extra = dict(load_config.model_loader_extra_config or {})
        self.plan_path: str | None = extra.pop("plan", None)
        base_config = copy.copy(load_config)
        base_config.load_format = "safetensors"
        base_config.model_loader_extra_config = extra
        super().__init__(base_config)
        self.checkpoint: Checkpoint | None = None
        self.plan: Plan | None = None
        #: Bytes of tensor data read from disk by the last load (pruned experts excluded).
        self.bytes_read = 0

    def _prepare(self, vllm_config: VllmConfig, model_config: ModelConfig) -> None:
        """Every check that can fail, before the model is built: nothing allocated yet."""
        ckpt = Checkpoint.open(model_config.model)
        shape = ckpt.shape
        if shape.family.model_type not in BINDINGS:
            raise MoePruneConfigError(
                f"{shape.family.model_type} is not served by the plugin yet; supported: {', '.join(sorted(BINDINGS))}"
            )
        hf_config = model_config.hf_config
        archs = list(getattr(hf_config, "architectures", None) or [])
        if archs != [shape.family.pruned_architecture]:
            raise MoePruneConfigError(
                f"--load-format {LOAD_FORMAT} needs the plugin's model class: add "
                f"--hf-overrides '{{\"architectures\": [\"{shape.family.pruned_architecture}\"], ...}}' "
                "(`vllm-moe-prune serve-args` prints the whole line)"
            )
        if shape.family.model_type.startswith("deepseek") and current_platform.is_cpu() \
                and _rope_type(ckpt.config) == "default":
            raise MoePruneConfigError(
                f"{ckpt.path}: DeepSeek without rope scaling is computed wrongly by vLLM's CPU build (its "
                "fused rotary kernel mis-rotates MLA's query and key); released DeepSeek configs use YaRN "
                "rope_scaling, which takes vLLM's correct path"
            )
        if vllm_config.parallel_config.enable_expert_parallel:
            raise MoePruneConfigError(
                "expert parallelism (--enable-expert-parallel) is not supported for pruned variants yet; "
                "use tensor parallelism (--tensor-parallel-size) instead"
            )
        counts = getattr(hf_config, CONFIG_COUNTS_KEY, None)
        if self.plan_path is None:
            if counts is not None:
                raise MoePruneConfigError(
                    f"--hf-overrides sets {CONFIG_COUNTS_KEY} but no plan was given: add "
                    "--model-loader-extra-config '{\"plan\": \"PLAN.yaml\"}'"
                )
            plan = None
        else:
            plan = Plan.load(self.plan_path)
            plan.validate_for(ckpt)
            wanted = {str(k): v for k, v in plan.experts_per_layer.items()}
            given = {str(k): int(v) for k, v in dict(counts or {}).items()}
            if given != wanted or getattr(hf_config, CONFIG_PLAN_KEY, None) != plan.plan_id:
                raise MoePruneConfigError(
                    f"--hf-overrides do not match plan {plan.plan_id} ({self.plan_path}): expected "
                    f"{CONFIG_COUNTS_KEY}={wanted} and {CONFIG_PLAN_KEY}={plan.plan_id!r}; "
                    "regenerate the flags with `vllm-moe-prune serve-args`"
                )
        self.checkpoint, self.plan = ckpt, plan

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        self._prepare(vllm_config, model_config)
        model = super().load_model(vllm_config, model_config, prefix)
        ckpt = self.checkpoint
        logger.info(
            "moe_prune: plan %s, read %.1f MiB of %.1f MiB checkpoint tensors (routed experts kept: %s)",
            self.plan.plan_id if self.plan else "none (full model)",
            self.bytes_read / 2**20,
            ckpt.total_bytes / 2**20,
            self.plan.experts_per_layer if self.plan else "all",
        )
        model.moe_prune_load_info = {
            "plan_id": self.plan.plan_id if self.plan else "full",
            "method": self.plan.method if self.plan else "none",
            "fingerprint": ckpt.fingerprint,
            "bytes_read": self.bytes_read,
        }
        return model

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The kept ids of every layer first, then the kept tensors, file by file."""
        # vLLM's own weight iterator starts the clock its "Loading weights took" log reads.
        self.counter_before_loading_weights = time.perf_counter()
        ckpt = self.checkpoint
        assert ckpt is not None, "load_model() prepares the checkpoint before weights are read"
        kept = self.plan.kept if self.plan else ckpt.experts
        for layer, ids in kept.items():
            yield f"{KEPT_TENSOR_PREFIX}{layer}", torch.tensor(ids, dtype=torch.int64)
        self.bytes_read = 0
        for name, tensor, _ in read_kept_tensors(ckpt, kept):
            self.bytes_read += tensor.numel() * tensor.element_size()
            yield name, tensor
