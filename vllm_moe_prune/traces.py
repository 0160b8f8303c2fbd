"""Trace shards: routing statistics on disk, in one versioned format (see docs/trace-format.md).

A serving fleet produces routing statistics continuously, on many hosts and ranks; the
planner runs later, elsewhere. In between they live as *shards*: each flush of a capture
buffer becomes one ``*.trace.safetensors`` file holding the :class:`RoutingStats`
tensors (plus, optionally, per-token samples) and its provenance as string metadata.
Shards are immutable, uniquely named and written atomically, so any number of servers
can write into one directory while a merge job reads it.

Every shard states the model fingerprint and the variant that served the traffic. Counts
are always in ORIGINAL expert ids, also for a pruned variant: statistics from the full
model and from any variant of it then add up index by index, and a later plan can be
made from them without knowing which variant served which shard.

Readers trust nothing: a shard is refused (``TraceError`` naming the file and the
problem) unless its version is known, its checksum matches, its metadata is complete and
agrees with its tensor shapes, and its statistics satisfy :meth:`RoutingStats.validate`.
:func:`load_traces` merges only when every shard passes (or reports what it skipped when
asked to), because a plan silently built from part of the traffic is worse than no plan.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vllm_moe_prune.atomic import atomic_path
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.stats import TENSOR_NAMES, RoutingStats, StatsError, tensor_layout

logger = logging.getLogger(__name__)

TRACE_FORMAT = "vllm-moe-prune/trace"
TRACE_VERSION = 1
SHARD_SUFFIX = ".trace.safetensors"
#: ``variant`` of traffic served by the unpruned model.
FULL_VARIANT = "full"

SAMPLE_IDS, SAMPLE_PROBS, SAMPLE_TOKENS = "sample_topk_ids", "sample_topk_probs", "sample_token_ids"
_REQUIRED_KEYS = (
    "format", "version", "fingerprint", "moe_layers", "num_experts", "top_k", "tokens",
    "variant", "label", "start", "end", "source_host", "source_pid", "source_rank",
)  # fmt: skip
#: Bad shards named in one error message; the rest are counted.
_MAX_LISTED = 10
#: Tokens per chunk when counting transitions, bounding the ``[tokens, k, k]`` pair buffer.
_PAIR_CHUNK = 65536


class TraceError(UserError):
    """A trace shard or trace set that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ShardMeta:
    """Provenance of one shard, everything but the statistics themselves.

    ``start``/``end`` are unix seconds (stored as ISO 8601 UTC, microsecond resolution).
    ``fingerprint`` is the ORIGINAL checkpoint's (a plan's ``fingerprint``), also for a
    pruned variant, whose ``variant`` is its plan id and ``kept`` the plan's kept original
    ids per MoE layer. ``label`` is the operator's name for the traffic (a domain, a
    tenant, a benchmark). ``host``/``pid``/``rank`` default to the calling process.
    """

    fingerprint: str
    start: float
    end: float
    label: str = "default"
    variant: str = FULL_VARIANT
    kept: dict[int, list[int]] | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    rank: int = 0


@dataclass
class Samples:
    """Per-token routing of sampled tokens, in original expert ids.

    ``topk_ids[n, l, j]`` is the ``j``-th expert chosen for sampled token ``n`` in MoE
    layer ``l``; ``topk_probs`` (optional, same shape) its full-softmax router
    probability, from which gate weights follow for either renormalisation rule;
    ``token_ids[n]`` (optional) the token itself. Token ids reveal the users' text, so
    :func:`write_shard` stores them only when explicitly asked to.
    """

    topk_ids: torch.Tensor
    topk_probs: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.topk_ids.shape[0])


@dataclass
class Shard:
    """One validated shard as read from disk."""

    path: Path
    meta: ShardMeta
    stats: RoutingStats
    samples: Samples | None
    checksum: str


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="microseconds")


def shard_checksum(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """The ``checksum`` metadata value of a shard with these metadata and tensors.

    safetensors has no integrity check of its own, and a flipped bit in a count or a
    label would otherwise be merged silently. The hash covers every metadata entry but
    ``checksum`` itself (canonical JSON) and every tensor's name and little-endian bytes;
    docs/trace-format.md states the algorithm for writers in other languages.
    """
    digest = hashlib.sha256()
    canonical = {k: v for k, v in metadata.items() if k != "checksum"}
    digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        data = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"\0{name}\0{data.nbytes}\0".encode())
        digest.update(data)
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------- decoding and validation


def _int(raw: Mapping[str, str], key: str, minimum: int) -> int:
    try:
        value = int(raw[key])
    except ValueError:
        raise TraceError(f"metadata {key}={raw[key]!r} is not an integer") from None
    if value < minimum:
        raise TraceError(f"metadata {key}={value} is below {minimum}")
    return value


def _json(raw: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(raw[key])
    except json.JSONDecodeError:
        raise TraceError(f"metadata {key}={raw[key]!r} is not valid JSON") from None


def _time(raw: Mapping[str, str], key: str) -> float:
    try:
        value = _dt.datetime.fromisoformat(raw[key])
    except ValueError:
        raise TraceError(f"metadata {key}={raw[key]!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise TraceError(f"metadata {key}={raw[key]!r} has no time zone")
    return value.timestamp()


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _decode_kept(
    raw: Mapping[str, str], moe_layers: tuple[int, ...], num_experts: int, top_k: int
) -> dict[int, list[int]] | None:
    """The kept map of a pruned variant; required there, forbidden for ``full``."""
    if raw["variant"] == FULL_VARIANT:
        if "kept" in raw:
            raise TraceError(f"variant {FULL_VARIANT!r} must not carry a kept map")
        return None
    if "kept" not in raw:
        raise TraceError(f"metadata is incomplete: pruned variant {raw['variant']!r} has no kept map")
    value = _json(raw, "kept")
    if not isinstance(value, dict):
        raise TraceError("metadata kept must map MoE layers to kept expert ids")
    try:
        kept = {int(layer): ids for layer, ids in value.items()}
    except ValueError:
        raise TraceError(f"metadata kept has non-integer layers {sorted(value)}") from None
    if set(kept) != set(moe_layers):
        raise TraceError(f"metadata kept covers layers {sorted(kept)}, not the MoE layers {list(moe_layers)}")
    for layer, ids in kept.items():
        if not _is_int_list(ids) or ids != sorted(set(ids)) or not ids or ids[0] < 0 or ids[-1] >= num_experts:
            raise TraceError(f"metadata kept[{layer}] must be ascending unique ids in [0, {num_experts}), got {ids!r}")
        if len(ids) < top_k:
            raise TraceError(f"metadata kept[{layer}] keeps {len(ids)} experts, fewer than top_k={top_k}")
    return kept


def _check_tensor(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], dtypes: tuple) -> None:
    tensor = tensors[name]
    if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TraceError(
            f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
            f"but the metadata implies {allowed} {list(shape)}"
        )


def _decode_samples(
    tensors: Mapping[str, torch.Tensor], stats: RoutingStats, kept: dict[int, list[int]] | None
) -> Samples | None:
    if SAMPLE_IDS not in tensors:
        if SAMPLE_PROBS in tensors or SAMPLE_TOKENS in tensors:
            raise TraceError(f"sample tensors without {SAMPLE_IDS}")
        return None
    ids = tensors[SAMPLE_IDS]
    n = int(ids.shape[0]) if ids.dim() == 3 else -1
    shape = (n, stats.num_layers, stats.top_k)
    _check_tensor(tensors, SAMPLE_IDS, shape, (torch.int16, torch.int32))
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= stats.num_experts):
        raise TraceError(f"{SAMPLE_IDS} holds expert ids outside [0, {stats.num_experts})")
    if kept is not None:
        for i, layer in enumerate(stats.moe_layers):
            if not torch.isin(ids[:, i], torch.tensor(kept[layer], dtype=ids.dtype)).all():
                raise TraceError(f"{SAMPLE_IDS} routes MoE layer {layer} to experts the variant does not keep")
    probs = tensors.get(SAMPLE_PROBS)
    if probs is not None:
        _check_tensor(tensors, SAMPLE_PROBS, shape, (torch.float32,))
        if not torch.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
            raise TraceError(f"{SAMPLE_PROBS} holds values that are not probabilities")
    tokens = tensors.get(SAMPLE_TOKENS)
    if tokens is not None:
        _check_tensor(tensors, SAMPLE_TOKENS, (n,), (torch.int32, torch.int64))
        if (tokens < 0).any():
            raise TraceError(f"{SAMPLE_TOKENS} holds negative token ids")
    return Samples(ids, probs, tokens)


def _check_transition_marginals(stats: RoutingStats) -> None:
    """Transitions must agree with the counts expert by expert, not only in total.

    A token routed to ``a`` in layer ``l`` adds ``top_k`` pairs ``(a, *)``, so row sums
    of ``transitions[l]`` are ``top_k * counts[l]`` and column sums ``top_k * counts[l+1]``.
    This catches transitions captured from other tokens than the counts, or in served
    instead of original ids, which the totals checked by ``validate()`` cannot see.
    """
    for i in range(stats.num_layers - 1):
        for axis, side, layer in ((1, "from", i), (0, "into", i + 1)):
            if not torch.equal(stats.transitions[i].sum(dim=axis), stats.top_k * stats.counts[layer]):
                raise TraceError(
                    f"transitions after MoE layer {stats.moe_layers[i]} disagree with the counts of the experts "
                    f"they lead {side} (MoE layer {stats.moe_layers[layer]})"
                )


def _decode(
    raw: Mapping[str, str], tensors: Mapping[str, torch.Tensor]
) -> tuple[ShardMeta, RoutingStats, Samples | None]:
    """Check a shard's metadata and tensors against each other; the one rule set.

    Used by the writer before anything reaches disk and by the reader after the
    checksum, so a shard written by this module is never refused by it.
    """
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise TraceError(f"metadata is incomplete: missing {missing}")
    moe_layers = _json(raw, "moe_layers")
    if not _is_int_list(moe_layers) or not moe_layers or moe_layers != sorted(set(moe_layers)) or moe_layers[0] < 0:
        raise TraceError(f"metadata moe_layers must be ascending non-negative layer indices, got {raw['moe_layers']!r}")
    moe_layers = tuple(moe_layers)
    num_experts = _int(raw, "num_experts", 1)
    top_k = _int(raw, "top_k", 1)
    if top_k > num_experts:
        raise TraceError(f"metadata top_k={top_k} exceeds num_experts={num_experts}")
    start, end = _time(raw, "start"), _time(raw, "end")
    if end < start:
        raise TraceError(f"metadata end {raw['end']} is before start {raw['start']}")
    for key in ("fingerprint", "variant"):
        if not raw[key]:
            raise TraceError(f"metadata {key} is empty")
    kept = _decode_kept(raw, moe_layers, num_experts, top_k)
    meta = ShardMeta(
        fingerprint=raw["fingerprint"], start=start, end=end, label=raw["label"], variant=raw["variant"],
        kept=kept, host=raw["source_host"], pid=_int(raw, "source_pid", 0), rank=_int(raw, "source_rank", 0),
    )  # fmt: skip

    unknown = sorted(set(tensors) - set(TENSOR_NAMES) - {SAMPLE_IDS, SAMPLE_PROBS, SAMPLE_TOKENS})
    absent = [name for name in TENSOR_NAMES if name not in tensors]
    if unknown or absent:
        raise TraceError(
            f"tensors do not match format version {TRACE_VERSION}"
            + (f"; missing {absent}" if absent else "")
            + (f"; unknown {unknown}" if unknown else "")
        )
    for name, (shape, dtype) in tensor_layout(len(moe_layers), num_experts).items():
        _check_tensor(tensors, name, shape, (dtype,))
    stats = RoutingStats(
        moe_layers=moe_layers, top_k=top_k, tokens=_int(raw, "tokens", 0), **{n: tensors[n] for n in TENSOR_NAMES}
    )
    try:
        stats.validate()
    except StatsError as exc:
        raise TraceError(str(exc)) from None
    _check_transition_marginals(stats)
    if kept is not None:
        for i, layer in enumerate(moe_layers):
            pruned = torch.ones(num_experts, dtype=torch.bool)
            pruned[kept[layer]] = False
            # Transitions need no check of their own: their marginals equal the counts.
            if stats.counts[i, pruned].any() or stats.gate_sum[i, pruned].any():
                raise TraceError(
                    f"MoE layer {layer}: routing to experts that variant {meta.variant} does not keep; "
                    "are the counts in served ids instead of original ids?"
                )
    return meta, stats, _decode_samples(tensors, stats, kept)


def _check_format(raw: Mapping[str, str]) -> None:
    if raw.get("format") != TRACE_FORMAT:
        raise TraceError(
            f"not a vllm-moe-prune trace shard (metadata format={raw.get('format')!r}, expected {TRACE_FORMAT!r})"
        )
    if raw.get("version") != str(TRACE_VERSION):
        raise TraceError(
            f"trace format version {raw.get('version')!r} is not supported (this vllm-moe-prune reads "
            f"version {TRACE_VERSION}); use the vllm-moe-prune release that wrote it"
        )


# ---------------------------------------------------------------- writing and reading


def _shard_name(meta: ShardMeta) -> str:
    """A name no other writer can produce: source, start time and a random suffix.

    The random part covers two flushes of one process within a microsecond (threads,
    ranks sharing a pid namespace); the time prefix makes ``ls`` list shards in order.
    """
    stamp = _dt.datetime.fromtimestamp(meta.start, _dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    host = re.sub(r"[^A-Za-z0-9.-]", "_", meta.host) or "host"
    return f"{stamp}_{host}_p{meta.pid}_r{meta.rank}_{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"


def _encode_meta(stats: RoutingStats, meta: ShardMeta) -> dict[str, str]:
    raw = {
        "format": TRACE_FORMAT,
        "version": str(TRACE_VERSION),
        "fingerprint": meta.fingerprint,
        "moe_layers": json.dumps(list(stats.moe_layers)),
        "num_experts": str(stats.num_experts),
        "top_k": str(stats.top_k),
        "tokens": str(stats.tokens),
        "variant": meta.variant,
        "label": meta.label,
        "start": _iso(meta.start),
        "end": _iso(meta.end),
        "source_host": meta.host,
        "source_pid": str(meta.pid),
        "source_rank": str(meta.rank),
    }
    if meta.kept is not None:
        raw["kept"] = json.dumps({str(layer): sorted(ids) for layer, ids in sorted(meta.kept.items())})
    return raw


def _encode_samples(samples: Samples, num_experts: int, include_token_ids: bool) -> dict[str, torch.Tensor]:
    id_dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
    out = {SAMPLE_IDS: samples.topk_ids.detach().cpu().to(id_dtype)}
    if samples.topk_probs is not None:
        out[SAMPLE_PROBS] = samples.topk_probs.detach().cpu().to(torch.float32)
    if samples.token_ids is not None:
        if include_token_ids:
            out[SAMPLE_TOKENS] = samples.token_ids.detach().cpu().to(torch.int64)
        else:
            logger.debug("token ids of %d samples not stored (include_token_ids=False)", len(samples))
    return out


def write_shard(
    target: str | Path,
    stats: RoutingStats,
    meta: ShardMeta,
    samples: Samples | None = None,
    *,
    include_token_ids: bool = False,
) -> Path:
    """Write one shard atomically and return its path.

    ``target`` is a directory (created if needed; the shard gets a unique name there, so
    any number of processes can share it) or an explicit ``*.safetensors`` file path
    (replaced if it exists). ``stats`` and ``samples`` must already be in ORIGINAL
    expert ids, also when a pruned variant served the traffic. Sample token ids are
    dropped unless ``include_token_ids`` is set, because they reveal the traffic's text.
    Raises :class:`TraceError` for anything a reader would refuse, before writing.
    """
    target = Path(target)
    path = target if target.suffix == ".safetensors" else target / _shard_name(meta)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in stats.tensors().items()}
    if samples is not None:
        tensors.update(_encode_samples(samples, stats.num_experts, include_token_ids))
    raw = _encode_meta(stats, meta)
    try:
        _decode(raw, tensors)
    except TraceError as exc:
        raise TraceError(f"refusing to write trace shard {path}: {exc}") from None
    raw["checksum"] = shard_checksum(raw, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=raw)
    logger.debug("wrote trace shard %s (%d tokens, label %s)", path, stats.tokens, meta.label)
    return path


def read_shard(path: str | Path) -> Shard:
    """Read and fully validate one shard; :class:`TraceError` names the file and the problem."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise TraceError(f"{path}: not a readable safetensors file (truncated or corrupt? {exc})") from None
    try:
        _check_format(raw)
        if "checksum" not in raw:
            raise TraceError("metadata is incomplete: missing ['checksum']")
        if shard_checksum(raw, tensors) != raw["checksum"]:
            raise TraceError("checksum mismatch: the file was corrupted or modified after it was written")
        meta, stats, samples = _decode(raw, tensors)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    return Shard(path, meta, stats, samples, raw["checksum"])


# ---------------------------------------------------------------- trace sets


def trace_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The shard files named by ``paths``: files as given, directories' ``*.trace.safetensors``.

    Directories are not searched recursively, so an old trace kept in a subdirectory is
    never merged by accident. A missing path or a directory without shards is an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob(f"*{SHARD_SUFFIX}"))
            if not found:
                raise TraceError(f"{path}: no trace shards (*{SHARD_SUFFIX}) in this directory")
        elif path.is_file():
            found = [path]
        else:
            raise TraceError(f"{path}: no such trace file or directory")
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                out.append(file)
    if not out:
        raise TraceError("no trace paths given")
    return out


@dataclass(frozen=True)
class ShardInfo:
    """Provenance of one merged shard (its tensors are not kept)."""

    path: Path
    meta: ShardMeta
    tokens: int
    samples: int
    checksum: str


@dataclass
class TraceSet:
    """All shards of one model merged into one :class:`RoutingStats`, with their provenance."""

    stats: RoutingStats
    fingerprint: str
    shards: list[ShardInfo]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.stats.tokens

    @property
    def labels(self) -> dict[str, int]:
        """Traced tokens per traffic label."""
        return self._tokens_by(lambda s: s.meta.label)

    @property
    def variants(self) -> dict[str, int]:
        """Traced tokens per served variant (``full`` or a plan id)."""
        return self._tokens_by(lambda s: s.meta.variant)

    def _tokens_by(self, key: Callable[[ShardInfo], str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for shard in self.shards:
            out[key(shard)] = out.get(key(shard), 0) + shard.tokens
        return dict(sorted(out.items()))

    @property
    def start(self) -> float:
        return min(s.meta.start for s in self.shards)

    @property
    def end(self) -> float:
        return max(s.meta.end for s in self.shards)

    @property
    def trace_id(self) -> str:
        """Content id of the merged set: the same shards give the same id, in any order."""
        return hashlib.sha256("\n".join(sorted(s.checksum for s in self.shards)).encode()).hexdigest()[:12]

    def provenance(self) -> dict[str, Any]:
        """What a plan records about the traffic it was made from (JSON/YAML-ready)."""
        return {
            "trace_id": self.trace_id,
            "fingerprint": self.fingerprint,
            "shards": len(self.shards),
            "tokens": self.tokens,
            "labels": self.labels,
            "variants": self.variants,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "skipped": [f"{path}: {reason}" for path, reason in self.skipped],
        }


def _refusal(bad: list[tuple[Path, str]], total: int) -> TraceError:
    listed = "; ".join(reason for _, reason in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return TraceError(
        f"{len(bad)} of {total} trace shards refused, nothing merged: {listed}{more} "
        "(skip_invalid=True / --skip-invalid merges the others and reports these)"
    )


def load_traces(
    paths: str | Path | Iterable[str | Path],
    fingerprint: str | None = None,
    label: str | None = None,
    *,
    variant: str | None = None,
    skip_invalid: bool = False,
) -> TraceSet:
    """Merge every shard of one model under ``paths`` (files or directories).

    ``label`` / ``variant`` select shards of that traffic label / served variant; others
    are left out silently. Invalid shards (unreadable, truncated, corrupt, inconsistent,
    another model than ``fingerprint``, an exact copy of another shard) abort the merge
    with one error naming every one of them: a plan must not be built from part of the
    traffic without anyone noticing. With ``skip_invalid=True`` they are left out
    instead, logged and listed in :attr:`TraceSet.skipped`. Without ``fingerprint``, the
    shards must all belong to one model; mixed models are refused either way, since
    there is no telling which one was meant.
    """
    files = trace_files(paths)
    bad: list[tuple[Path, str]] = []
    merged: dict[str, RoutingStats] = {}
    infos: dict[str, list[ShardInfo]] = {}
    seen: dict[str, Path] = {}
    present: dict[str, set[str]] = {"label": set(), "variant": set()}
    for path in files:
        try:
            shard = read_shard(path)
        except TraceError as exc:
            bad.append((path, str(exc)))
            continue
        meta = shard.meta
        present["label"].add(meta.label)
        present["variant"].add(meta.variant)
        if (label is not None and meta.label != label) or (variant is not None and meta.variant != variant):
            continue
        if fingerprint is not None and meta.fingerprint != fingerprint:
            bad.append((path, f"{path}: traced model {meta.fingerprint}, not {fingerprint}"))
            continue
        if shard.checksum in seen:
            bad.append((path, f"{path}: same content as {seen[shard.checksum]}; a copy would be counted twice"))
            continue
        seen[shard.checksum] = path
        total = merged.get(meta.fingerprint)
        if total is not None and not total.compatible_with(shard.stats):
            bad.append((path, f"{path}: statistics shaped unlike the other shards of model {meta.fingerprint}"))
            continue
        merged[meta.fingerprint] = shard.stats if total is None else total + shard.stats
        info = ShardInfo(path, meta, shard.stats.tokens, len(shard.samples or ()), shard.checksum)
        infos.setdefault(meta.fingerprint, []).append(info)

    if bad:
        if not skip_invalid:
            raise _refusal(bad, len(files))
        for _, reason in bad:
            logger.warning("skipped trace shard %s", reason)
    if len(merged) > 1:
        groups = ", ".join(f"{fp} ({len(v)} shards, e.g. {v[0].path})" for fp, v in sorted(infos.items()))
        raise TraceError(f"trace shards of {len(merged)} different models: {groups}; pass the fingerprint of one")
    if not merged:
        wanted = [f"{k} {v!r}" for k, v in (("label", label), ("variant", variant)) if v is not None]
        if wanted and not bad:
            raise TraceError(
                f"no trace shard with {' and '.join(wanted)} in {len(files)} shards "
                f"(labels: {sorted(present['label'])}, variants: {sorted(present['variant'])})"
            )
        raise TraceError(f"none of the {len(files)} trace shards can be used; {len(bad)} refused")
    ((fp, stats),) = merged.items()
    shards = sorted(infos[fp], key=lambda s: (s.meta.start, str(s.path)))
    traces = TraceSet(stats, fp, shards, bad)
    if len(traces.variants) > 1:
        logger.warning(
            "merging traffic served by several variants %s: a pruned variant never routes to the experts "
            "it dropped, so their counts are biased low",
            sorted(traces.variants),
        )
    logger.info("merged %d trace shards: %d tokens, labels %s", len(shards), traces.tokens, traces.labels)
    return traces


# ---------------------------------------------------------------- interop


def from_routed_experts(
    routed: Any,
    num_experts: int,
    moe_layers: Sequence[int],
    probs: Any = None,
    *,
    renormalise: bool = False,
) -> RoutingStats:
    """Statistics of per-token routing arrays such as vLLM's ``routed_experts``.

    ``routed[tokens, L, top_k]`` (any integer array or tensor) holds original expert ids
    per token and MoE layer; padding (``-1``) must be removed first. Counts and
    transitions are exact. Without ``probs`` the probability and gate sums are zero.
    ``probs`` (same shape) are the router's full-softmax probabilities of the routed
    experts, as in :class:`Samples`: ``prob_sum`` then holds their sum, which lacks the
    mass the router gave to unrouted experts, and ``gate_sum`` the gate weights derived
    from them (renormalised over the top-k when ``renormalise``, as the family does).
    """
    ids = torch.as_tensor(routed)
    if ids.dim() != 3 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TraceError(
            f"routed experts must be an integer array [tokens, layers, top_k], got {ids.dtype} {list(ids.shape)}"
        )
    tokens, num_layers, top_k = ids.shape
    if num_layers != len(moe_layers):
        raise TraceError(f"routed experts cover {num_layers} layers, but {len(moe_layers)} MoE layers were given")
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise TraceError(f"routed experts hold ids outside [0, {num_experts}); drop padded (-1) tokens first")
    stats = RoutingStats.zeros(tuple(moe_layers), num_experts, top_k)
    stats.tokens = tokens
    for i in range(num_layers):
        stats.counts[i] = torch.bincount(ids[:, i].reshape(-1), minlength=num_experts)
    for i in range(num_layers - 1):
        for chunk in ids.split(_PAIR_CHUNK):
            pairs = chunk[:, i, :, None] * num_experts + chunk[:, i + 1, None, :]
            stats.transitions[i] += torch.bincount(pairs.reshape(-1), minlength=num_experts**2).view(num_experts, -1)
    if probs is not None:
        p = torch.as_tensor(probs).to(torch.float64)
        if tuple(p.shape) != tuple(ids.shape):
            raise TraceError(f"probs shape {list(p.shape)} differs from routed experts shape {list(ids.shape)}")
        if not torch.isfinite(p).all() or (p < 0).any():
            raise TraceError("probs must be finite and non-negative")
        gates = p / p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny) if renormalise else p
        for i in range(num_layers):
            stats.prob_sum[i].index_add_(0, ids[:, i].reshape(-1), p[:, i].reshape(-1))
            stats.gate_sum[i].index_add_(0, ids[:, i].reshape(-1), gates[:, i].reshape(-1))
    stats.validate()
    return stats


def to_logical_count(
    stats: RoutingStats | Sequence[RoutingStats], num_hidden_layers: int | None = None
) -> torch.Tensor:
    """Counts as an SGLang/EPLB-style ``logical_count[steps, layers, experts]`` int64 tensor.

    One :class:`RoutingStats` gives one step; a sequence (e.g. shards in time order)
    gives one step each. The layer axis is the MoE layers (``moe_layers`` order) unless
    ``num_hidden_layers`` is given: then it is every decoder layer, dense ones zero,
    which is what SGLang's ``--init-expert-location`` expects.
    """
    steps = [stats] if isinstance(stats, RoutingStats) else list(stats)
    if not steps:
        raise TraceError("no statistics to convert")
    first = steps[0]
    if not all(first.compatible_with(s) for s in steps):
        raise TraceError("statistics of different shapes cannot form one logical_count tensor")
    counts = torch.stack([s.counts for s in steps])
    if num_hidden_layers is None:
        return counts
    if num_hidden_layers <= max(first.moe_layers):
        raise TraceError(f"num_hidden_layers={num_hidden_layers}, but MoE layer {max(first.moe_layers)} exists")
    out = torch.zeros(len(steps), num_hidden_layers, first.num_experts, dtype=torch.int64)
    out[:, list(first.moe_layers)] = counts
    return out


def save_logical_count(
    path: str | Path, stats: RoutingStats | Sequence[RoutingStats], num_hidden_layers: int | None = None
) -> Path:
    """Save :func:`to_logical_count` as a ``.pt`` dict ``{"logical_count": tensor}``, like SGLang's dump.

    Only tensors are stored, so ``torch.load(path, weights_only=True)`` reads it.
    """
    tensor = to_logical_count(stats, num_hidden_layers)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"logical_count": tensor}, tmp)
    return path
