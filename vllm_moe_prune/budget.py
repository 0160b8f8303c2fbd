"""Budgets: how many experts a plan may keep, from what the user can reason about.

A user thinks in memory ("the variant must fit in 40GiB"), in a share of the model ("keep
half the experts") or in experts per layer ("8/layer"). Methods think in expert counts:
uniform methods keep the same number in every layer, non-uniform ones distribute one
global count. :func:`resolve_budget` converts between the two exactly, with the
checkpoint's per-expert byte sizes (dtype-aware, from the safetensors headers), so a
plan never exceeds the memory it was given, and it applies the serving constraints
(:class:`Constraints`) that every method must respect on top of the budget.

Budget forms (``--budget``):

* ``40GiB``, ``512MiB``, ``64KiB``, ``1.5TiB`` (binary) or ``40GB``, ``800MB``, ``2TB``
  (decimal) or ``123456789B`` / ``5e9bytes``: total weight memory of the served
  variant (dense weights, router and shared experts included), as
  ``Plan.predicted["weight_bytes"]`` reports it;
* ``50%`` or ``0.5``: the share of routed-expert weight bytes to KEEP (a bare number
  must lie in (0, 1]; for experts of one dtype this is the share of routed parameters);
* ``8/layer``: experts kept in every MoE layer that is not pinned whole.

When routed experts differ in size (mixed precision), counts are derived from the
largest expert a choice could include, so the byte budget holds whichever experts a
method picks; with equally sized experts (every supported family) the conversion is exact.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from vllm_moe_prune.errors import UserError

if TYPE_CHECKING:
    from vllm_moe_prune.checkpoint import Checkpoint
    from vllm_moe_prune.families import MoEShape

logger = logging.getLogger(__name__)

#: Byte units accepted in memory budgets, lower-cased.
UNITS: dict[str, int] = {
    "b": 1,
    "bytes": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_UNIT_NAMES = {"b": "B", "bytes": "B", "kb": "KB", "mb": "MB", "gb": "GB", "tb": "TB"} | {
    u: u[0].upper() + "iB" for u in ("kib", "mib", "gib", "tib")
}

_NUMBER = r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)"  # decimal, optional exponent: "5e9B"
_MEMORY_RE = re.compile(rf"^{_NUMBER}\s*([a-z]+)$", re.IGNORECASE)
_PERCENT_RE = re.compile(rf"^{_NUMBER}\s*%$", re.IGNORECASE)
_FRACTION_RE = re.compile(rf"^{_NUMBER}$", re.IGNORECASE)
_PER_LAYER_RE = re.compile(r"^(\d+)\s*/\s*layers?$", re.IGNORECASE)

_FORMS = "e.g. '40GiB' (weight memory), '50%' or '0.5' (share of routed experts kept), '8/layer'"


class BudgetError(UserError):
    """A budget that cannot be parsed or cannot be met."""


class ConstraintError(UserError):
    """Pinned experts or layers that do not exist in the model."""


@dataclass(frozen=True)
class Constraints:
    """What every plan must respect, whatever the method and budget.

    ``top_k``: the router must still find ``top_k`` experts in every layer.
    ``num_groups``: grouped top-k routing (DeepSeek): every group keeps the same number
    of experts, so per-layer counts are multiples of it; expert ``e`` is in group
    ``e // (num_experts // num_groups)``; ``min_per_group``: the fewest a group may keep
    (:attr:`MoEShape.min_kept_per_group`). ``pinned_experts``: decoder layer index ->
    expert ids that must be kept. ``pinned_layers``: decoder layer indices kept whole
    (their experts count against the budget).
    """

    top_k: int
    num_groups: int = 1
    min_per_group: int = 1
    pinned_experts: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    pinned_layers: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        pinned = {int(layer): tuple(sorted({int(e) for e in ids})) for layer, ids in self.pinned_experts.items()}
        object.__setattr__(self, "pinned_experts", {layer: ids for layer, ids in pinned.items() if ids})
        object.__setattr__(self, "pinned_layers", frozenset(int(layer) for layer in self.pinned_layers))

    @classmethod
    def for_shape(
        cls,
        shape: "MoEShape",
        pinned_experts: Mapping[int, Sequence[int]] | None = None,
        pinned_layers: Sequence[int] = (),
    ) -> "Constraints":
        """The constraints of a checkpoint's routing shape plus the user's pins, validated."""
        constraints = cls(
            shape.top_k, shape.num_groups, shape.min_kept_per_group, dict(pinned_experts or {}), frozenset(pinned_layers)
        )
        constraints.validate(shape.moe_layers, shape.num_experts)
        return constraints

    def validate(self, moe_layers: Sequence[int], num_experts: int) -> None:
        """Refuse pins outside the model and routing shapes no plan could serve."""
        layers = set(moe_layers)
        for what, named in (("pinned layers", self.pinned_layers), ("pinned experts", set(self.pinned_experts))):
            unknown = sorted(set(named) - layers)
            if unknown:
                raise ConstraintError(
                    f"{what}: {unknown} are not MoE layers of this model (MoE layers: {sorted(layers)})"
                )
        for layer, ids in self.pinned_experts.items():
            bad = [e for e in ids if not 0 <= e < num_experts]
            if bad:
                raise ConstraintError(f"pinned experts of layer {layer}: {bad} out of range [0, {num_experts})")
        if self.num_groups < 1 or num_experts % self.num_groups:
            raise ConstraintError(f"{num_experts} experts cannot form {self.num_groups} equal routing groups")
        if not 1 <= self.top_k <= num_experts:
            raise ConstraintError(f"top_k={self.top_k} must lie in [1, {num_experts}]")

    def group_size(self, num_experts: int) -> int:
        return num_experts // self.num_groups

    def pinned_in(self, layer: int) -> tuple[int, ...]:
        return self.pinned_experts.get(layer, ())

    def min_experts(self, layer: int, num_experts: int) -> int:
        """Fewest experts ``layer`` can keep: all if pinned whole, else top_k and its pins, group-balanced."""
        if layer in self.pinned_layers:
            return num_experts
        size = self.group_size(num_experts)
        pins_per_group = [0] * self.num_groups
        for e in self.pinned_in(layer):
            pins_per_group[e // size] += 1
        per_group = max(-(-self.top_k // self.num_groups), self.min_per_group, max(pins_per_group))
        return per_group * self.num_groups


@dataclass(frozen=True)
class Budget:
    """A resolved budget, in the two forms methods consume.

    ``total``: experts kept over all MoE layers, pinned layers included (non-uniform
    methods distribute it). ``per_layer``: experts kept in every layer that is not
    pinned whole (uniform methods); ``None`` when a budget resolved for a non-uniform
    method fits no uniform count. ``max_kept_bytes``: routed-expert bytes the plan may
    keep, when the budget was given in memory or as a share.
    """

    total: int
    per_layer: int | None
    spec: str = ""
    max_kept_bytes: int | None = None


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed ``--budget`` string. ``value``: bytes, kept share, or experts per layer."""

    text: str
    kind: Literal["memory", "share", "per_layer"]
    value: int | Fraction
    unit: str

    def format(self, amount: Fraction) -> str:
        """``amount`` (bytes, share or count) in this spec's unit, rounded up so it is feasible."""
        if self.kind == "per_layer":
            return f"{math.ceil(amount)}/layer"
        if self.kind == "share":
            if self.unit == "%":
                return f"{_ceil_decimal(amount * 100, 2)}%"
            return str(_ceil_decimal(amount, 4))
        scale = UNITS[self.unit.lower()]
        if scale == 1:
            return f"{math.ceil(amount)}B"
        return f"{_ceil_significant(amount / scale, 4)}{self.unit}"


def _ceil_decimal(value: Fraction, places: int) -> str:
    """``value`` rounded UP to ``places`` decimals, so a reported minimum is itself feasible."""
    return format(Decimal(math.ceil(value * 10**places)).scaleb(-places).normalize(), "f")


def _ceil_significant(value: Fraction, digits: int) -> str:
    """``value`` rounded UP to ``digits`` significant digits, so a reported minimum is itself feasible."""
    if value <= 0:
        return "0"
    places = digits - 1 - math.floor(math.log10(value))
    return _ceil_decimal(value, places) if places > 0 else str(math.ceil(value / 10**-places) * 10**-places)


def parse_budget(text: str) -> BudgetSpec:
    """Parse a ``--budget`` string; see the module docstring for the accepted forms."""
    raw = str(text).strip()
    if match := _PER_LAYER_RE.match(raw):
        count = int(match.group(1))
        if count < 1:
            raise BudgetError(f"budget '{raw}': keep at least one expert per layer")
        return BudgetSpec(raw, "per_layer", count, "/layer")
    if match := _PERCENT_RE.match(raw):
        return _share(raw, Fraction(match.group(1)) / 100, "%")
    if match := _FRACTION_RE.match(raw):
        share = Fraction(match.group(1))
        if share > 1:
            raise BudgetError(
                f"budget '{raw}' is ambiguous: a bare number is the share of routed experts kept, in (0, 1]; "
                f"write '{raw}/layer' for experts per layer or add a unit ('{raw}GiB') for memory"
            )
        return _share(raw, share, "fraction")
    if match := _MEMORY_RE.match(raw):
        unit = match.group(2).lower()
        if unit not in UNITS:
            raise BudgetError(
                f"budget '{raw}': unknown unit '{match.group(2)}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        amount = math.floor(Fraction(match.group(1)) * UNITS[unit])
        if amount <= 0:
            raise BudgetError(f"budget '{raw}' is empty")
        return BudgetSpec(raw, "memory", amount, _UNIT_NAMES[unit])
    raise BudgetError(f"cannot read budget '{raw}'; {_FORMS}")


def _share(raw: str, share: Fraction, unit: str) -> BudgetSpec:
    if not 0 < share <= 1:
        raise BudgetError(f"budget '{raw}': the share of routed experts kept must lie in (0, 100%]")
    return BudgetSpec(raw, "share", share, unit)


class _Layout:
    """Per-layer byte accounting of one model under given constraints.

    Every layer not pinned whole keeps its pinned experts plus some others; "others" are
    costed at the largest unpinned expert of the layer, so counts derived here hold for
    whichever experts a method picks.
    """

    def __init__(self, expert_bytes: Sequence[Sequence[int]], constraints: Constraints, moe_layers: Sequence[int]):
        if len(expert_bytes) != len(moe_layers):
            raise ValueError(f"expert sizes for {len(expert_bytes)} layers, but {len(moe_layers)} MoE layers")
        self.num_experts = len(expert_bytes[0])
        constraints.validate(moe_layers, self.num_experts)
        self.groups = constraints.num_groups
        self.fixed = 0  # bytes every plan keeps: pinned layers whole, pinned experts
        self.whole_layers = 0
        self.free: list[tuple[int, int, int]] = []  # (pinned count, min experts, unit bytes) per open layer
        for layer, sizes in zip(moe_layers, expert_bytes, strict=True):
            if layer in constraints.pinned_layers:
                self.fixed += sum(sizes)
                self.whole_layers += 1
                continue
            pins = constraints.pinned_in(layer)
            self.fixed += sum(sizes[e] for e in pins)
            unit = max((s for e, s in enumerate(sizes) if e not in pins), default=0)
            self.free.append((len(pins), constraints.min_experts(layer, self.num_experts), unit))
        self.routed = sum(sum(sizes) for sizes in expert_bytes)
        self.min_uniform = max((m for _, m, _ in self.free), default=self.num_experts)
        self.min_total = self.whole_layers * self.num_experts + sum(m for _, m, _ in self.free)
        self.largest = max((u for _, _, u in self.free), default=0)

    def uniform_bytes(self, per_layer: int) -> int:
        return self.fixed + sum((per_layer - pins) * unit for pins, _, unit in self.free)

    def min_global_bytes(self) -> int:
        return self.fixed + sum((low - pins) * unit for pins, low, unit in self.free)

    def total_for(self, per_layer: int) -> int:
        return self.whole_layers * self.num_experts + per_layer * len(self.free)

    def max_uniform(self, max_bytes: int) -> int | None:
        """Most experts per open layer within ``max_bytes`` (a multiple of the group count), or None."""
        fits = [
            r for r in range(self.min_uniform, self.num_experts + 1, self.groups) if self.uniform_bytes(r) <= max_bytes
        ]
        return fits[-1] if fits else None

    def max_total(self, max_bytes: int) -> int | None:
        """Most experts over all layers within ``max_bytes``, in whole groups, or None."""
        spare = max_bytes - self.min_global_bytes()
        if spare < 0:
            return None
        room = sum(self.num_experts - low for _, low, _ in self.free)
        extra = room if self.largest == 0 else min(room, spare // self.largest)
        return self.min_total + extra - extra % self.groups


def resolve_budget(
    spec: str | BudgetSpec,
    expert_bytes: Sequence[Sequence[int]],
    constraints: Constraints,
    moe_layers: Sequence[int],
    *,
    dense_bytes: int = 0,
    uniform: bool = True,
) -> Budget:
    """Convert a budget into expert counts that never exceed it, or explain the smallest that works.

    ``expert_bytes[i][e]``: bytes of expert ``e`` of the ``i``-th MoE layer;
    ``dense_bytes``: every other weight byte of the model (memory budgets include them).
    ``uniform`` says which count the method will use, and so which minimum applies: a
    uniform method needs the largest per-layer minimum in every layer.
    """
    spec = spec if isinstance(spec, BudgetSpec) else parse_budget(spec)
    layout = _Layout(expert_bytes, constraints, moe_layers)
    if spec.kind == "per_layer":
        return _per_layer_budget(spec, layout, uniform)
    if spec.kind == "memory":
        max_kept = int(spec.value) - dense_bytes
    else:
        max_kept = math.floor(spec.value * layout.routed)
    per_layer = layout.max_uniform(max_kept)
    total = layout.max_total(max_kept)
    if total is None or (uniform and per_layer is None):
        minimum = layout.uniform_bytes(layout.min_uniform) if uniform else layout.min_global_bytes()
        needed = Fraction(minimum + dense_bytes) if spec.kind == "memory" else Fraction(minimum, layout.routed)
        raise BudgetError(
            f"budget '{spec.text}' is too small: the smallest feasible budget is {spec.format(needed)} "
            f"({_minimum_reason(layout, uniform)}"
            + (
                f"; dense weights take {spec.format(Fraction(dense_bytes))}"
                if spec.kind == "memory" and dense_bytes
                else ""
            )
            + ")"
        )
    if max_kept >= layout.routed:
        logger.info("budget '%s' keeps every routed expert", spec.text)
    return Budget(total=total, per_layer=per_layer, spec=spec.text, max_kept_bytes=max_kept)


def _per_layer_budget(spec: BudgetSpec, layout: _Layout, uniform: bool) -> Budget:
    count = int(spec.value)
    if count > layout.num_experts:
        raise BudgetError(f"budget '{spec.text}': the model has only {layout.num_experts} experts per layer")
    if count < layout.min_uniform or count % layout.groups:
        smallest = layout.min_uniform
        raise BudgetError(
            f"budget '{spec.text}' is not feasible: the smallest feasible budget is {smallest}/layer "
            f"({_minimum_reason(layout, True)})"
            + (f"; counts must be multiples of {layout.groups} routing groups" if layout.groups > 1 else "")
        )
    return Budget(total=layout.total_for(count), per_layer=count, spec=spec.text)


def _minimum_reason(layout: _Layout, uniform: bool) -> str:
    if uniform:
        parts = [f"{layout.min_uniform} experts in each of {len(layout.free)} prunable layers"]
    else:
        parts = [f"{layout.min_total} experts over all layers, at least top_k in each"]
    if layout.groups > 1:
        parts.append(f"balanced over {layout.groups} groups")
    if layout.whole_layers:
        parts.append(f"{layout.whole_layers} pinned layer{'s' if layout.whole_layers > 1 else ''} kept whole")
    if layout.fixed and not layout.whole_layers:
        parts.append("pinned experts kept")
    return ", ".join(parts)


def budget_for_checkpoint(
    spec: str | BudgetSpec, ckpt: "Checkpoint", constraints: Constraints | None = None, *, uniform: bool = True
) -> Budget:
    """:func:`resolve_budget` with the byte sizes of a checkpoint's safetensors headers."""
    ckpt.require_original("set budgets")
    shape = ckpt.shape
    constraints = constraints or Constraints.for_shape(shape)
    return resolve_budget(
        spec,
        ckpt.expert_bytes,
        constraints,
        shape.moe_layers,
        dense_bytes=ckpt.total_bytes - ckpt.routed_expert_bytes,
        uniform=uniform,
    )
