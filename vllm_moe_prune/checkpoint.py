"""A Hugging Face checkpoint directory seen through its safetensors headers.

Budgets, plans, fingerprints and the loader all need tensor names, dtypes, shapes and
byte sizes, but never the weights themselves: the headers tell all of it, so a model
larger than RAM (or than this machine's disk cache) is indexed in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from vllm_moe_prune.errors import UserError
from vllm_moe_prune.families import Config, MoEShape

#: Largest safetensors header we accept; the format itself caps headers at 100 MB.
_MAX_HEADER = 100 * 1024 * 1024
#: config.json key under which an exported variant records its pruning (see export.py).
PRUNED_CONFIG_KEY = "moe_prune"


class CheckpointError(UserError):
    """The directory is not a readable safetensors checkpoint."""


def recorded_expert_counts(config: Config, shape: MoEShape) -> dict[int, int] | None:
    """Routed experts per MoE layer that an exported variant's config records, else None.

    An export stores kept experts renumbered ``0..k-1`` per layer; the family's own
    expert count in its config is the largest ``k``, so only this record says how many
    experts each layer really holds (they differ for a non-uniform plan).
    """
    record = config.get(PRUNED_CONFIG_KEY)
    if record is None:
        return None
    counts = record.get("experts_per_layer") if isinstance(record, dict) else None
    if not isinstance(counts, dict):
        raise CheckpointError(f"config.json: {PRUNED_CONFIG_KEY}.experts_per_layer must map MoE layers to counts")
    try:
        parsed = {int(layer): int(n) for layer, n in counts.items()}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: {PRUNED_CONFIG_KEY}.experts_per_layer is malformed ({exc})") from exc
    if sorted(parsed) != list(shape.moe_layers):
        raise CheckpointError(
            f"config.json: {PRUNED_CONFIG_KEY}.experts_per_layer names layers {sorted(parsed)}, "
            f"but the MoE layers are {list(shape.moe_layers)}"
        )
    for layer, n in parsed.items():
        if not shape.top_k <= n <= shape.num_experts:
            raise CheckpointError(
                f"config.json: {PRUNED_CONFIG_KEY}.experts_per_layer gives MoE layer {layer} {n} experts; "
                f"expected {shape.top_k} (top_k) to {shape.num_experts}"
            )
    return parsed


def held_expert_counts(config: Config, shape: MoEShape) -> dict[int, int]:
    """Routed experts each MoE layer's tensors hold: what an export kept, else all of them."""
    return recorded_expert_counts(config, shape) or {layer: shape.num_experts for layer in shape.moe_layers}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one ``.safetensors`` file, read from its header only."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise CheckpointError(f"{path}: safetensors header of {length} bytes is not plausible")
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from exc
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = TensorInfo(path.name, meta["dtype"], tuple(meta["shape"]), end - start)
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its config and the index of every tensor in it."""

    path: Path
    config: Config
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a model directory: it has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has no .safetensors files (only safetensors checkpoints are supported)")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            tensors.update(read_safetensors_header(file))
        return cls(path, config, tensors)

    @cached_property
    def shape(self) -> MoEShape:
        return MoEShape.from_config(self.config)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the model a trace or plan belongs to.

        Hashes the routing-relevant config and the tensor index (names, dtypes, shapes),
        not the weight bytes: cheap for any size, and still different for any other
        architecture, size or export. Two copies of one checkpoint share it.
        """
        keys = sorted(self.tensors)
        index = [[k, self.tensors[k].dtype, list(self.tensors[k].shape)] for k in keys]
        shape = self.shape
        payload = {
            "model_type": self.config.get("model_type"),
            "moe_layers": list(shape.moe_layers),
            "num_experts": shape.num_experts,
            "top_k": shape.top_k,
            "tensors": index,
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return f"sha256:{digest[:32]}"

    @cached_property
    def experts_per_layer(self) -> dict[int, int]:
        """Routed experts each MoE layer holds: all of them, or what an export kept."""
        return held_expert_counts(self.config, self.shape)

    @property
    def experts(self) -> dict[int, list[int]]:
        """Ids of the routed experts each MoE layer holds (the "keep everything" plan)."""
        return {layer: list(range(n)) for layer, n in self.experts_per_layer.items()}

    @property
    def is_export(self) -> bool:
        """Whether this is a variant written by ``vllm-moe-prune export``."""
        return self.config.get(PRUNED_CONFIG_KEY) is not None

    def require_original(self, action: str) -> None:
        """Refuse to ``action`` on an export: plans and budgets index the original experts."""
        if self.is_export:
            raise CheckpointError(
                f"{self.path} is a pruned export (plan {self.config[PRUNED_CONFIG_KEY].get('plan_id')}); "
                f"{action} on the original checkpoint it was exported from"
            )

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes of one routed expert's weights on disk (dtype-aware, from the header)."""
        total = 0
        for name in self.shape.family.expert_tensor_names(layer, expert):
            if name not in self.tensors:
                raise CheckpointError(f"{self.path}: expected tensor {name} is missing")
            total += self.tensors[name].nbytes
        return total

    @cached_property
    def expert_bytes(self) -> list[list[int]]:
        """``[moe layer][expert]`` byte sizes of every routed expert this checkpoint holds."""
        return [[self.expert_nbytes(layer, e) for e in ids] for layer, ids in self.experts.items()]

    @cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def routed_expert_bytes(self) -> int:
        return sum(sum(row) for row in self.expert_bytes)
