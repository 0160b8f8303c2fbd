"""Write a pruned variant as a standalone Hugging Face checkpoint.

The exported directory needs neither the original checkpoint nor the plan file to be
served: pruned experts are gone, kept experts are renumbered ``0..k-1`` in the plan's
(ascending) order, the router rows and per-expert router vectors (DeepSeek-V3's
``e_score_correction_bias``) are sliced with them, and shared experts, attention and
every other tensor are copied unchanged. The plan rides along as ``moe_prune_plan.yaml``
so the variant can always be traced back to the model and traces it came from.

A uniform plan (the same count in every MoE layer) yields an ordinary checkpoint of the
same family with a smaller expert count: transformers and stock vLLM load it. A
non-uniform plan cannot be expressed with the single expert count every family's config
has: its config carries the largest count plus ``"moe_prune": {"experts_per_layer": ...}``
and names the plugin's model class as its architecture, so it loads through this
project's vLLM plugin only (``vllm serve OUT_DIR`` with the plugin installed, or the
line ``vllm-moe-prune serve-args --model OUT_DIR`` prints).

Weights are streamed: each tensor is read on its own from the safetensors files (pruned
experts are never read) and output shards are flushed at ``max_shard_bytes``, so peak
memory is one shard, not the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_moe_prune.atomic import atomic_directory
from vllm_moe_prune.checkpoint import PRUNED_CONFIG_KEY, Checkpoint, CheckpointError
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.remap import read_kept_tensors

logger = logging.getLogger(__name__)

PLAN_FILE = "moe_prune_plan.yaml"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
#: Files of the source directory that the export rewrites or must not carry over.
_NOT_COPIED = {"config.json", "model.safetensors.index.json", PLAN_FILE}
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class ExportError(UserError):
    """The export cannot be written where it was asked to go."""


def _check_tensors(ckpt: Checkpoint) -> None:
    """Every routed expert and router the family defines must be in the checkpoint."""
    family = ckpt.shape.family
    for layer in ckpt.shape.moe_layers:
        expected = [family.router_name(layer)]
        for expert in range(ckpt.shape.num_experts):
            expected += family.expert_tensor_names(layer, expert)
        missing = [n for n in expected if n not in ckpt.tensors]
        if missing:
            raise CheckpointError(f"{ckpt.path}: expected tensors {missing[:5]} are missing")


class _ShardWriter:
    """Collects output tensors and writes them as safetensors shards of bounded size."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Give the shards their Hugging Face names and write the index if there are several."""
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        count = len(self.shards)
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def pruned_config(ckpt: Checkpoint, plan: Plan) -> dict:
    """The exported ``config.json``: expert count rewritten, pruning recorded."""
    config = dict(ckpt.config)
    family = ckpt.shape.family
    count = max(plan.experts_per_layer.values())
    keys = [key for key in family.experts_keys if config.get(key) is not None]
    for key in keys:
        config[key] = count
    if not plan.is_uniform:
        # vLLM picks the model class by architecture: the plugin's class builds each layer
        # with its recorded count, and vLLM without the plugin names the class it lacks.
        config["architectures"] = [family.pruned_architecture]
    config[PRUNED_CONFIG_KEY] = {
        "plan_id": plan.plan_id,
        "source_fingerprint": plan.fingerprint,
        "uniform": plan.is_uniform,
        "experts_per_layer": {str(layer): n for layer, n in plan.experts_per_layer.items()},
    }
    return config


def export_pruned(
    model_dir: str | Path, plan: Plan, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write the variant of ``model_dir`` that ``plan`` describes to ``out_dir`` (new).

    The plan must have been made for this checkpoint (same fingerprint). The directory
    appears complete or not at all.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists; choose a new output directory")
    ckpt = Checkpoint.open(model_dir)
    plan.validate_for(ckpt)
    _check_tensors(ckpt)
    with atomic_directory(out_dir) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for _, tensor, remap in read_kept_tensors(ckpt, plan.kept):
            writer.add(remap.name, remap.apply(tensor))
        writer.finish()
        _copy_other_files(ckpt.path, tmp)
        (tmp / "config.json").write_text(json.dumps(pruned_config(ckpt, plan), indent=2) + "\n")
        plan.save(tmp / PLAN_FILE)
    kept = sum(plan.experts_per_layer.values())
    total = len(ckpt.shape.moe_layers) * ckpt.shape.num_experts
    logger.info(
        "exported plan %s to %s: %d of %d routed experts kept%s",
        plan.plan_id,
        out_dir,
        kept,
        total,
        "" if plan.is_uniform else " (non-uniform: loads through the vllm-moe-prune plugin only)",
    )
    return out_dir


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config and other top-level non-weight files."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED:
            continue
        if path.name.endswith(_OTHER_WEIGHT_SUFFIXES):
            if not path.name.endswith(".safetensors"):
                logger.warning("not copying %s: weights in other formats are not exported", path.name)
            continue
        shutil.copy2(path, dst / path.name)
