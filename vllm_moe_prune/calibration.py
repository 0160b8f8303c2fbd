"""The calibration pass: every expert's output on a small prompt sample, one layer at a time.

Reconstruction-based pruning methods need, per MoE layer, what every expert computes on
every calibration token (:class:`vllm_moe_prune.signals.LayerSignals`). Serving never
computes that (a token only visits its top-k experts), so this pass runs the model
itself, with transformers, and streams it: the embeddings are loaded, then each decoder
layer in turn is read from the safetensors files (only that layer's tensors), run on the
hidden states of all calibration sequences, recorded and freed. Peak memory is one
decoder layer plus the hidden states and one layer's signals, so a model larger than RAM
is never materialised whole.

To run a lone decoder layer exactly as the full model would, the model's own forward is
run once per sequence with every decoder layer replaced by a recorder: that captures the
arguments the model gives each layer (causal mask, rotary position embeddings, position
ids) from the model's own code, for every family, instead of re-deriving them here.

On disk a calibration is a directory (written atomically)::

    manifest.json               format, version, model fingerprint and routing shape,
                                prompt provenance (file, hash, lines used, tokens, seed)
    tokens.safetensors          input_ids[T], seq_index[T]
    layer_NNN.safetensors       router_logits[T,E], expert_out[T,E,H], layer_out[T,H], hidden[T,H]

and :func:`load_calibration` turns it back into :class:`CalibrationSignals` that load one
layer file at a time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from vllm_moe_prune.atomic import atomic_directory
from vllm_moe_prune.checkpoint import Checkpoint, CheckpointError
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.families import UnsupportedModelError
from vllm_moe_prune.prompts import Prompt, read_prompts, tokenize
from vllm_moe_prune.signals import CalibrationSignals, LayerSignals

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = "vllm-moe-prune/calibration"
CALIBRATION_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.safetensors"
LAYER_TENSORS = ("router_logits", "expert_out", "layer_out", "hidden")
DEFAULT_MAX_TOKENS = 2048
DEFAULT_MAX_SEQ_LEN = 512

#: Checkpoint-name renames transformers applies when loading a family (its
#: ``conversion_mapping``), besides fusing the per-expert tensors.
_CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}


class CalibrationError(UserError):
    """Bad calibration input (prompts, options) or an unreadable calibration directory."""


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def select_sequences(
    prompts: list[Prompt], tokenizer: Any, max_tokens: int, max_seq_len: int, seed: int
) -> list[tuple[int, list[int]]]:
    """``(line, token ids)`` of the calibration sequences, at most ``max_tokens`` in all.

    Prompts are taken in a seeded random order, so a token budget samples the whole file
    rather than its first lines (files are often grouped by task or domain); each is cut
    to ``max_seq_len`` tokens, and the last one to what is left of the budget.
    """
    if max_tokens < 1 or max_seq_len < 1:
        raise CalibrationError(f"--max-tokens and --max-seq-len must be positive, got {max_tokens} and {max_seq_len}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        ids = tokenize(prompts[i], tokenizer)[: min(max_seq_len, max_tokens - total)]
        if ids:
            chosen.append((prompts[i].line, ids))
            total += len(ids)
        if total >= max_tokens:
            break
    return chosen


# --------------------------------------------------------------------------- streamed model


class _Stop(Exception):
    """Raised by the last layer recorder: the rest of the model's forward is not needed."""


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer and records the arguments the model passes it."""

    def __init__(self, calls: list[tuple[tuple, dict]], last: bool) -> None:
        super().__init__()
        self.calls = calls
        self.last = last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append(((hidden_states, *args), kwargs))
        if self.last:
            raise _Stop
        return hidden_states


class StreamedModel:
    """A transformers MoE model whose decoder layers are loaded one at a time from disk.

    The skeleton is built on the ``meta`` device (no memory); :meth:`layer` materialises
    one decoder layer from exactly its tensors in the safetensors files (per-expert
    checkpoint tensors fused into transformers' ``gate_up_proj`` / ``down_proj`` layout)
    and :meth:`release` frees it again. :meth:`hidden_states` runs sequences through the
    layers that way. Weights are cast to float32 as they are read: the signals are
    float32, and CPU matmuls in half precision are slower, not faster.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if ckpt.config.get("quantization_config"):
            method = ckpt.config["quantization_config"].get("quant_method", "?")
            raise UnsupportedModelError(
                f"{ckpt.path} is quantized ({method}); calibration needs unquantized (bf16/fp16/fp32) weights"
            )
        self.ckpt = ckpt
        self.shape = ckpt.shape
        config = AutoConfig.from_pretrained(str(ckpt.path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.base = model.get_submodule("model")
        self.layers = self.base.layers
        # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: build them here.
        self.base.rotary_emb = type(self.base.rotary_emb)(config=model.config)
        # Embeddings and the other small tensors outside the decoder layers.
        outside = self._read(lambda n: n.startswith("model.") and not n.startswith("model.layers."))
        self.base.load_state_dict({n.removeprefix("model."): t for n, t in outside.items()}, strict=False, assign=True)
        missing = [n for n, p in self.base.named_parameters() if p.is_meta and not n.startswith("layers.")]
        if missing:
            raise CheckpointError(f"{ckpt.path}: no checkpoint tensor for model.{', model.'.join(missing)}")

    def module_name(self, checkpoint_name: str) -> str:
        """The transformers module path of a (non-expert) checkpoint tensor."""
        for old, new in _CHECKPOINT_RENAMES.get(self.shape.family.model_type, ()):
            checkpoint_name = checkpoint_name.replace(old, new)
        return checkpoint_name

    def _read(self, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Tensors whose names satisfy ``wanted``, each read on its own from its file."""
        by_file: dict[str, list[str]] = {}
        for name, info in self.ckpt.tensors.items():
            if wanted(name):
                by_file.setdefault(info.file, []).append(name)
        out = {}
        for file, names in sorted(by_file.items()):
            with safe_open(str(self.ckpt.path / file), framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name).float()
        return out

    def layer_inputs(self, input_ids: list[int]) -> list[tuple[tuple, dict]]:
        """The arguments the model's own forward passes to each decoder layer, for one sequence.

        Entry 0's first argument is the embedded sequence; the others' first argument is
        a placeholder that :meth:`hidden_states` replaces with the previous layer's output.
        """
        calls: list[tuple[tuple, dict]] = []
        count = len(self.layers)
        self.base.layers = nn.ModuleList([_LayerRecorder(calls, last=i == count - 1) for i in range(count)])
        try:
            with torch.no_grad():
                self.base(input_ids=torch.tensor([input_ids]), use_cache=False)
        except _Stop:
            pass
        finally:
            self.base.layers = self.layers
        if len(calls) != count:
            raise UnsupportedModelError(f"the model's forward called {len(calls)} of its {count} decoder layers")
        return calls

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights loaded."""
        prefix = f"model.layers.{index}."
        raw = self._read(lambda n: n.startswith(prefix))
        module = self.layers[index]
        state = self._fuse_experts(index, module, raw) if index in self.shape.moe_layers else {}
        state.update({self.module_name(n).removeprefix(prefix): t for n, t in raw.items()})
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.ckpt.path}: decoder layer {index} does not match its tensors: {exc}") from exc
        still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if still_meta:
            raise UnsupportedModelError(f"decoder layer {index}: no checkpoint tensor for {still_meta}")
        return module.eval()

    def _fuse_experts(self, index: int, module: nn.Module, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pop MoE layer ``index``'s per-expert tensors from ``raw``, fused as transformers holds them."""
        family = self.shape.family
        experts_name, experts = experts_module(module)
        gate_up, down = [], []
        for expert in range(self.shape.num_experts):
            names = family.expert_tensor_names(index, expert)
            missing = [n for n in names if n not in raw]
            if missing:
                raise CheckpointError(f"{self.ckpt.path}: expected tensors {missing} are missing")
            gate, up, down_proj = (raw.pop(n) for n in names)
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(down_proj)
        fused = {"gate_up_proj": torch.stack(gate_up), "down_proj": torch.stack(down)}
        for name, tensor in fused.items():
            expected = tuple(getattr(experts, name).shape)
            if tuple(tensor.shape) != expected:
                raise UnsupportedModelError(
                    f"decoder layer {index}: fused {name} is {list(tensor.shape)}, the model expects {list(expected)}"
                )
        return {f"{experts_name}.{name}": tensor for name, tensor in fused.items()}

    def release(self, index: int) -> None:
        """Free decoder layer ``index``'s weights (back to the meta device)."""
        self.layers[index].to("meta")

    @torch.no_grad()
    def hidden_states(
        self,
        sequences: list[list[int]],
        last: int,
        watch: Callable[[int, nn.Module], contextlib.AbstractContextManager] | None = None,
    ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield ``(index, [1, S, H] output of decoder layer index per sequence)`` for layers ``0..last``.

        One layer is in memory at a time; ``watch(index, layer)`` may install hooks while
        the sequences run through that layer.
        """
        inputs = [self.layer_inputs(ids) for ids in sequences]
        hidden = [calls[0][0][0] for calls in inputs]
        for index in range(last + 1):
            module = self.layer(index)
            with watch(index, module) if watch else contextlib.nullcontext():
                outputs = []
                for state, calls in zip(hidden, inputs):
                    args, kwargs = calls[index]
                    out = module(state, *args[1:], **kwargs)
                    outputs.append(out[0] if isinstance(out, tuple) else out)
            hidden = outputs
            self.release(index)
            yield index, hidden


def experts_module(layer: nn.Module) -> tuple[str, nn.Module]:
    """The routed-experts module of a transformers MoE decoder layer (fused 3-D weights).

    Refuses layouts :func:`all_expert_outputs` does not compute (transposed or
    interleaved gate/up, biases, ungated experts).
    """
    for name, module in layer.named_modules():
        if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and isinstance(
            getattr(module, "down_proj", None), torch.Tensor
        ):
            layout_ok = (
                not getattr(module, "is_transposed", False)
                and getattr(module, "is_concatenated", True)
                and not getattr(module, "has_bias", False)
                and getattr(module, "has_gate", True)
            )
            if not layout_ok:
                raise UnsupportedModelError(f"{type(module).__name__}: expert weight layout not supported")
            return name, module
    raise UnsupportedModelError(f"{type(layer).__name__} has no fused routed-experts module")


def all_expert_outputs(experts: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[T, E, H]``: every expert of ``experts`` applied to every token of ``hidden[T, H]``.

    Same arithmetic as transformers' expert loop (``gate, up = chunk(x W_gu^T)``,
    ``act(gate) * up`` then ``W_d``), without gate weights.
    """
    gate, up = torch.einsum("th,eoh->teo", hidden, experts.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("tei,ehi->teh", experts.act_fn(gate) * up, experts.down_proj)


# --------------------------------------------------------------------------- the pass


class _MoERecorder:
    """Fills one MoE layer's signals, sequence after sequence, through forward hooks."""

    def __init__(self, streamed: StreamedModel, tokens: int) -> None:
        self.streamed = streamed
        shape = streamed.shape
        hidden_size = streamed.base.config.hidden_size
        self.buffers = {
            "router_logits": torch.empty(tokens, shape.num_experts),
            "expert_out": torch.empty(tokens, shape.num_experts, hidden_size),
            "layer_out": torch.empty(tokens, hidden_size),
            "hidden": torch.empty(tokens, hidden_size),
        }
        self.router_offset = self.experts_offset = 0

    @contextlib.contextmanager
    def watch(self, index: int, layer: nn.Module) -> Iterator[None]:
        """Record MoE layer ``index`` (no-op for dense layers) while sequences run through it."""
        if index not in self.streamed.shape.moe_layers:
            yield
            return
        self.router_offset = self.experts_offset = 0
        prefix = f"model.layers.{index}."
        router_path = self.streamed.module_name(self.streamed.shape.family.router_name(index))
        router = layer.get_submodule(router_path.removeprefix(prefix).removesuffix(".weight"))
        _, experts = experts_module(layer)
        handles = [router.register_forward_hook(self._on_router), experts.register_forward_hook(self._on_experts)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        expected = len(self.buffers["hidden"])
        if self.router_offset != expected or self.experts_offset != expected:
            raise RuntimeError(
                f"layer {index}: recorded {self.router_offset} router and {self.experts_offset} expert tokens "
                f"of {expected}"
            )

    def _on_router(self, module: nn.Module, args: tuple, output: Any) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        logits = logits.reshape(-1, logits.shape[-1])
        self.buffers["router_logits"][self.router_offset : self.router_offset + len(logits)] = logits
        self.router_offset += len(logits)

    def _on_experts(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        hidden = args[0].reshape(-1, args[0].shape[-1])
        span = slice(self.experts_offset, self.experts_offset + len(hidden))
        self.buffers["hidden"][span] = hidden
        self.buffers["layer_out"][span] = output.reshape(hidden.shape)
        self.buffers["expert_out"][span] = all_expert_outputs(module, hidden)
        self.experts_offset += len(hidden)


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def run_calibration(
    model_dir: str | Path,
    prompts_file: str | Path,
    out_dir: str | Path,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Run the calibration pass of ``model_dir`` on ``prompts_file`` into ``out_dir`` (new)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CalibrationError(f"{out_dir} already exists; choose a new output directory")
    ckpt = Checkpoint.open(model_dir)
    shape = ckpt.shape
    prompts = read_prompts(prompts_file)
    sequences = select_sequences(prompts, _load_tokenizer(ckpt.path), max_tokens, max_seq_len, seed)
    token_ids = [ids for _, ids in sequences]
    tokens = sum(len(ids) for ids in token_ids)
    streamed = StreamedModel(ckpt)
    hidden_size = streamed.base.config.hidden_size
    per_layer = tokens * (shape.num_experts + 3) * hidden_size * 4
    logger.info(
        "calibrating %s on %d sequences (%d tokens): %d MoE layers, about %.1f MiB of signals per layer",
        ckpt.path, len(sequences), tokens, len(shape.moe_layers), per_layer / 2**20,
    )  # fmt: skip
    if shape.family.model_type.startswith("deepseek"):
        logger.warning(
            "%s routing (grouped top-k, scaling%s) is recorded in layer_out but not modelled by "
            "signals.moe_output, which assumes softmax top-k routing",
            shape.family.model_type,
            ", sigmoid scores with score bias" if shape.family.router_extras else "",
        )
    recorder = _MoERecorder(streamed, tokens)
    last = max(shape.moe_layers)
    with atomic_directory(out_dir) as tmp:
        layers = streamed.hidden_states(token_ids, last, watch=recorder.watch)
        for index, _ in tqdm(layers, total=last + 1, desc="calibration", unit="layer", disable=not progress):
            if index in shape.moe_layers:
                save_file(recorder.buffers, str(tmp / layer_file(index)), metadata={"layer": str(index)})
        seq_index = torch.cat([torch.full((len(ids),), i, dtype=torch.int64) for i, ids in enumerate(token_ids)])
        input_ids = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64)
        save_file({"input_ids": input_ids, "seq_index": seq_index}, str(tmp / TOKENS_FILE))
        prompts_path = Path(prompts_file)
        manifest = {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "path": str(ckpt.path.resolve()),
                "fingerprint": ckpt.fingerprint,
                "model_type": shape.family.model_type,
                "moe_layers": list(shape.moe_layers),
                "num_experts": shape.num_experts,
                "top_k": shape.top_k,
                "renormalise": shape.renormalise,
                "num_groups": shape.num_groups,
                "hidden_size": hidden_size,
            },
            "prompts": {
                "file": str(prompts_path.resolve()),
                "sha256": _sha256(prompts_path),
                "prompts_in_file": len(prompts),
                "sequences": len(sequences),
                "tokens": tokens,
                "seed": seed,
                "max_tokens": max_tokens,
                "max_seq_len": max_seq_len,
                "lines": [line for line, _ in sequences],
            },
            "layers": [{"layer": layer, "file": layer_file(layer)} for layer in shape.moe_layers],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote calibration signals to %s", out_dir)
    return out_dir


# --------------------------------------------------------------------------- loading


def read_manifest(calib_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of a calibration directory."""
    path = Path(calib_dir) / MANIFEST
    if not path.is_file():
        raise CalibrationError(f"{calib_dir} is not a calibration directory: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"{path}: not a vllm-moe-prune calibration (expected format {CALIBRATION_FORMAT})")
    if manifest.get("version") != CALIBRATION_VERSION:
        raise CalibrationError(f"{path}: calibration version {manifest.get('version')!r} is not supported")
    return manifest


def _load_tensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        data = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CalibrationError(f"{path}: unreadable calibration file ({exc})") from exc
    missing = [n for n in names if n not in data]
    if missing:
        raise CalibrationError(f"{path}: missing tensors {missing}")
    return data


def load_calibration(calib_dir: str | Path, fingerprint: str | None = None) -> CalibrationSignals:
    """Calibration signals of ``calib_dir``, each MoE layer read from disk when asked for.

    With ``fingerprint``, refuses signals recorded on another model.
    """
    calib_dir = Path(calib_dir)
    manifest = read_manifest(calib_dir)
    model = manifest["model"]
    if fingerprint is not None and model["fingerprint"] != fingerprint:
        raise CalibrationError(
            f"{calib_dir} was recorded on model {model['fingerprint']}, not on {fingerprint}; calibrate this model"
        )
    seq_index = _load_tensors(calib_dir / TOKENS_FILE, ("seq_index",))["seq_index"]
    files = [calib_dir / entry["file"] for entry in manifest["layers"]]

    def load_layer(i: int) -> LayerSignals:
        data = _load_tensors(files[i], LAYER_TENSORS)
        return LayerSignals(**{name: data[name] for name in LAYER_TENSORS}, seq_index=seq_index)

    return CalibrationSignals(
        moe_layers=tuple(model["moe_layers"]),
        num_experts=model["num_experts"],
        top_k=model["top_k"],
        renormalise=model["renormalise"],
        num_sequences=manifest["prompts"]["sequences"],
        load_layer=load_layer,
        num_groups=model["num_groups"],
    )
