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


class CheckpointError(UserError):
    """The directory is not a readable safetensors checkpoint."""


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
        """``[moe layer][expert]`` byte sizes of every routed expert."""
        shape = self.shape
        return [[self.expert_nbytes(layer, e) for e in range(shape.num_experts)] for layer in shape.moe_layers]

    @cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def routed_expert_bytes(self) -> int:
        return sum(sum(row) for row in self.expert_bytes)
