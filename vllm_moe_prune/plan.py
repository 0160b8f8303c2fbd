"""The pruning plan: which original experts each MoE layer keeps, as a validated YAML file.

A plan is the contract between the planner and the loader. It names the model it was
made for (fingerprint), how it was made (method, parameters, trace provenance), and per
MoE layer the kept ORIGINAL expert ids in ascending order: kept expert ``kept[i]`` is
served as expert ``i``. Everything a loader needs to fail closed is checked here, before
any weight is read: :func:`validate_kept` is the one place those rules live.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.families import MoEShape

PLAN_FORMAT = "vllm-moe-prune/plan"
PLAN_VERSION = 1


class PlanError(UserError):
    """A plan file is malformed or does not fit the model it is applied to."""


def validate_kept(shape: MoEShape, kept: dict[int, list[int]], pinned: dict[int, list[int]] | None = None) -> None:
    """Refuse a kept-expert assignment that cannot be served, naming the layer and problem.

    Rules: every MoE layer present and no other layer; ids are integers in
    ``[0, num_experts)`` without duplicates; at least ``top_k`` kept per layer (the router
    must still find k experts); with grouped routing (DeepSeek) every group keeps the
    same number; pinned experts are kept.
    """
    expected = set(shape.moe_layers)
    got = set(kept)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise PlanError(
            "plan layers do not match the model's MoE layers"
            + (f"; missing layers {missing}" if missing else "")
            + (f"; layers {extra} are not MoE layers of this model" if extra else "")
        )
    for layer in shape.moe_layers:
        ids = kept[layer]
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise PlanError(f"layer {layer}: expert ids must be integers, got {ids!r}")
        bad = [e for e in ids if not 0 <= e < shape.num_experts]
        if bad:
            raise PlanError(f"layer {layer}: expert ids {bad} out of range [0, {shape.num_experts})")
        if len(set(ids)) != len(ids):
            dups = sorted({e for e in ids if ids.count(e) > 1})
            raise PlanError(f"layer {layer}: expert ids {dups} are listed more than once")
        if len(ids) < shape.top_k:
            raise PlanError(
                f"layer {layer}: keeps {len(ids)} experts, fewer than top_k={shape.top_k}; the router needs at least top_k"
            )
        if shape.num_groups > 1:
            per_group = shape.num_experts // shape.num_groups
            counts = [sum(1 for e in ids if e // per_group == g) for g in range(shape.num_groups)]
            if len(set(counts)) != 1:
                raise PlanError(
                    f"layer {layer}: grouped routing needs the same number of kept experts in every "
                    f"group, got {counts} across {shape.num_groups} groups"
                )
            if counts[0] < shape.min_kept_per_group:
                raise PlanError(
                    f"layer {layer}: keeps {counts[0]} experts per group; a token picks top_k={shape.top_k} "
                    f"inside {shape.topk_groups} of {shape.num_groups} groups"
                    + (" ranked by their two best experts" if shape.group_score == "top2_sum" else "")
                    + f", so every group needs at least {shape.min_kept_per_group}"
                )
        if pinned and layer in pinned:
            lost = sorted(set(pinned[layer]) - set(ids))
            if lost:
                raise PlanError(f"layer {layer}: pinned experts {lost} are not kept")


@dataclass
class Plan:
    """A pruning plan. ``kept[layer]`` holds original expert ids, ascending."""

    fingerprint: str
    model_type: str
    num_experts: int
    top_k: int
    kept: dict[int, list[int]]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.kept = {int(layer): sorted(ids) for layer, ids in self.kept.items()}

    @property
    def plan_id(self) -> str:
        """Short content id: the same model and kept sets give the same id."""
        payload = json.dumps([self.fingerprint, sorted(self.kept.items())])
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {layer: len(ids) for layer, ids in sorted(self.kept.items())}

    @property
    def is_uniform(self) -> bool:
        return len(set(self.experts_per_layer.values())) == 1

    @classmethod
    def for_checkpoint(cls, ckpt: Checkpoint, kept: dict[int, list[int]], method: str, **extra: Any) -> "Plan":
        """A plan for ``ckpt`` with predicted bytes filled in from its safetensors headers."""
        shape = ckpt.shape
        validate_kept(shape, kept, extra.pop("pinned", None))
        plan = cls(ckpt.fingerprint, shape.family.model_type, shape.num_experts, shape.top_k, kept, method, **extra)
        plan.predicted = predicted_bytes(ckpt, plan.kept)
        return plan

    def validate_for(self, ckpt: Checkpoint) -> None:
        """Fail closed unless this plan fits ``ckpt`` exactly."""
        ckpt.require_original("apply plans")
        if self.fingerprint != ckpt.fingerprint:
            raise PlanError(
                f"plan was made for model {self.fingerprint}, but {ckpt.path} is {ckpt.fingerprint}; "
                "make a new plan from traces of this model"
            )
        validate_kept(ckpt.shape, self.kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "plan_id": self.plan_id,
            "created": self.created,
            "model": {
                "fingerprint": self.fingerprint,
                "model_type": self.model_type,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
            },
            "method": {"name": self.method, "params": self.params},
            "provenance": self.provenance,
            "predicted": self.predicted,
            "layers": [{"layer": layer, "kept": ids} for layer, ids in sorted(self.kept.items())],
        }

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        def need(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
            if not isinstance(mapping, dict) or key not in mapping:
                raise PlanError(f"{source}: missing '{where}{key}'")
            value = mapping[key]
            if not isinstance(value, kind):
                raise PlanError(f"{source}: '{where}{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
            return value

        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not a vllm-moe-prune plan (expected format: {PLAN_FORMAT})")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        model = need(data, "model", dict, "")
        method = need(data, "method", dict, "")
        layers = need(data, "layers", list, "")
        kept: dict[int, list[int]] = {}
        for i, entry in enumerate(layers):
            layer = need(entry, "layer", int, f"layers[{i}].")
            ids = need(entry, "kept", list, f"layers[{i}].")
            if layer in kept:
                raise PlanError(f"{source}: layer {layer} is listed twice")
            kept[layer] = ids
        for layer, ids in kept.items():
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
                raise PlanError(f"{source}: layer {layer}: expert ids must be integers, got {ids!r}")
        plan = cls(
            fingerprint=need(model, "fingerprint", str, "model."),
            model_type=need(model, "model_type", str, "model."),
            num_experts=need(model, "num_experts", int, "model."),
            top_k=need(model, "top_k", int, "model."),
            kept=kept,
            method=need(method, "name", str, "method."),
            params=method.get("params") or {},
            provenance=data.get("provenance") or {},
            predicted=data.get("predicted") or {},
            created=str(data.get("created", "")),
        )
        stated = data.get("plan_id")
        if stated is not None and stated != plan.plan_id:
            raise PlanError(f"{source}: plan_id {stated} does not match its content ({plan.plan_id}); was it edited?")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise PlanError(f"{path}: not valid YAML ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def predicted_bytes(ckpt: Checkpoint, kept: dict[int, list[int]]) -> dict[str, int]:
    """Weight bytes of the variant, exact from the checkpoint's per-expert sizes."""
    shape = ckpt.shape
    kept_bytes = sum(
        ckpt.expert_bytes[i][e] for i, layer in enumerate(shape.moe_layers) for e in kept[layer]
    )
    # The served variant also keeps the sliced router rows; the full router rows stay in
    # memory too (for coverage), so the router is counted whole, like the other dense weights.
    pruned = ckpt.routed_expert_bytes - kept_bytes
    return {
        "weight_bytes_full": ckpt.total_bytes,
        "weight_bytes": ckpt.total_bytes - pruned,
        "routed_expert_bytes_kept": kept_bytes,
        "routed_expert_bytes_pruned": pruned,
    }
