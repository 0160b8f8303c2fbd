"""How a checkpoint tensor maps into a pruned variant: the one definition of renumbering.

Kept expert ``kept[l][i]`` of MoE layer ``l`` becomes expert ``i``; its tensors are renamed,
the tensors of pruned experts are dropped (and so never read), and the router matrix with
its per-expert vectors (router bias, DeepSeek's ``e_score_correction_bias``) keeps only
the kept rows, in the same order. The vLLM loader and the standalone exporter both use
:class:`PrunedLayout`, so a served variant and an exported checkpoint cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.families import MoEShape


@dataclass(frozen=True)
class TensorRemap:
    """Where one checkpoint tensor goes: its new name, and the rows to keep (None: all)."""

    name: str
    rows: tuple[int, ...] | None = None

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor[list(self.rows)].contiguous()


class PrunedLayout:
    """Name and row mapping from an original checkpoint to one pruned variant.

    Every tensor under a routed expert's prefix moves with its expert, not only the
    weights the family names: quantized checkpoints carry scales beside each weight.
    """

    def __init__(self, shape: MoEShape, kept: dict[int, list[int]]) -> None:
        self.shape = shape
        self.kept = {layer: sorted(ids) for layer, ids in kept.items()}
        family = shape.family
        self._expert = re.compile(
            re.escape(family.expert).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        )
        self._new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in self.kept.items()}
        self._routers: dict[str, tuple[int, ...]] = {}
        self._router_layers: dict[str, int] = {}
        for layer in shape.moe_layers:
            rows = tuple(self.kept[layer])
            self._router_layers[family.router_name(layer)] = layer
            for name in (family.router_name(layer), *family.router_extra_names(layer)):
                self._routers[name] = rows

    def remap(self, name: str) -> TensorRemap | None:
        """The tensor's place in the variant, or None for a pruned expert's tensor."""
        match = self._expert.match(name)
        if match is not None and int(match["layer"]) in self._new_id:
            layer = int(match["layer"])
            new = self._new_id[layer].get(int(match["expert"]))
            if new is None:
                return None
            return TensorRemap(self.shape.family.expert_prefix(layer, new) + name[match.end():])
        return TensorRemap(name, self._routers.get(name))

    def router_layer(self, name: str) -> int | None:
        """The MoE layer whose router matrix ``name`` is, else None."""
        return self._router_layers.get(name)


def read_kept_tensors(ckpt: Checkpoint, kept: dict[int, list[int]]) -> Iterator[tuple[str, torch.Tensor, TensorRemap]]:
    """``(original name, tensor, remap)`` of every tensor the variant keeps, file by file.

    Tensors of pruned experts are never read from disk: this is where the loader's and
    the exporter's memory and I/O savings come from.
    """
    layout = PrunedLayout(ckpt.shape, kept)
    for file in sorted({info.file for info in ckpt.tensors.values()}):
        with safe_open(ckpt.path / file, framework="pt") as f:
            for name in f.keys():
                remap = layout.remap(name)
                if remap is not None:
                    yield name, f.get_tensor(name), remap
