"""Prunable, traceable variants of vLLM's MoE model classes, one per supported family
(Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2, DeepSeek-V3).

vLLM reads ONE expert count from the config for every layer. Each class here subclasses
vLLM's own model class and changes three things, nothing else:

1. Construction: every MoE layer is built with its own kept-expert count (from
   ``moe_prune_experts_per_layer`` in the config, set through ``--hf-overrides`` by
   ``vllm-moe-prune serve-args``, or from the record an export carries in its
   config.json), so pruned experts are never allocated. The family's
   decoder-layer ``__init__`` is wrapped, for the duration of construction only, so that
   each layer sees its own count in the config.
2. Capture: every MoE layer's router (vLLM's own router object, given a subclass) hands
   the routing it computed, its logits, gate weights and expert ids, to the model's
   :class:`~plugins.capture.RoutingRecorder`, and the model's forward counts the step's
   routing for all layers at once after vLLM's compiled model returns (see capture.py),
   in original expert ids, so live coverage of the kept set is measurable.
3. A check, once: the first step that serves tokens runs through the compiled model and
   again eagerly, and the eager result is served from then on if they differ (see
   compile_check.py), since capture changes the graph inductor compiles.

Weight loading keeps vLLM's own code; ``load_weights`` only renumbers kept experts and
slices router rows through :class:`vllm_moe_prune.remap.PrunedLayout`, fed by the
``moe_prune`` loader, which reads nothing of the pruned experts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import plugin_logger
from .capture import COUNT_BATCH_TOKENS, RoutingRecorder, capturing_cuda_graph
from .compile_check import CompileCheck
from .settings import CompileSettings, SampleSettings
from vllm_moe_prune.checkpoint import held_expert_counts
from vllm_moe_prune.families import FAMILIES, MoEShape
from vllm_moe_prune.remap import PrunedLayout
from vllm_moe_prune.serving import CONFIG_COUNTS_KEY

#: Name prefix of the extra tensors the moe_prune loader sends ahead of the weights.
KEPT_TENSOR_PREFIX = "moe_prune.kept."

logger = plugin_logger(__name__)


@dataclass(frozen=True)
class VllmBinding:
    """Where a family lives inside vLLM."""

    module: str
    model_class: str
    layer_class: str
    moe_attr: str


BINDINGS: dict[str, VllmBinding] = {
    "qwen3_moe": VllmBinding("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeDecoderLayer", "mlp"),
    "qwen2_moe": VllmBinding("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeDecoderLayer", "mlp"),
    "mixtral": VllmBinding("vllm.model_executor.models.mixtral", "MixtralForCausalLM", "MixtralDecoderLayer", "block_sparse_moe"),
    "olmoe": VllmBinding("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", "OlmoeDecoderLayer", "mlp"),
    "deepseek_v2": VllmBinding(
        "vllm.model_executor.models.deepseek_v2", "DeepseekV2ForCausalLM", "DeepseekV2DecoderLayer", "mlp"
    ),
    "deepseek_v3": VllmBinding(
        "vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM", "DeepseekV2DecoderLayer", "mlp"
    ),
}


def experts_per_layer(config, shape: MoEShape) -> dict[int, int]:
    """Count of every MoE layer to build: the plan's (config override) or what the checkpoint holds."""
    counts = getattr(config, CONFIG_COUNTS_KEY, None)
    if counts is None:
        return held_expert_counts(config.to_dict(), shape)
    counts = {int(k): int(v) for k, v in dict(counts).items()}
    if set(counts) != set(shape.moe_layers):
        raise ValueError(
            f"{CONFIG_COUNTS_KEY} names layers {sorted(counts)}, but the MoE layers are {list(shape.moe_layers)}"
        )
    return counts


@contextlib.contextmanager
def _expert_count(config, keys: tuple[str, ...], count: int) -> Iterator[None]:
    """Show ``count`` as the config's expert count while one layer is being built."""
    saved = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    try:
        for key in saved:
            setattr(config, key, count)
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _set_inductor_order(vllm_config) -> None:
    """Turn inductor's peak-memory reordering off where the user asked to.

    On by default, as in stock vLLM: turning it off for every model cost about 5% of the
    engine's throughput. The check in compile_check.py guards it, and names this setting
    (``MOE_PRUNE_INDUCTOR_REORDER=0``) if the compiled model computes something else.
    """
    if not CompileSettings.from_env().reorder_for_peak_memory:
        vllm_config.compilation_config.inductor_compile_config["reorder_for_peak_memory"] = False


def _serves_tokens() -> bool:
    """Whether this forward pass serves real tokens: not a warm-up pass (vLLM's CPU runner
    gives those no attention metadata) and not a CUDA-graph capture."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return (
        is_forward_context_available()
        and get_forward_context().attn_metadata is not None
        and not capturing_cuda_graph()
    )


@functools.cache
def _traced_router_class(router_class: type) -> type:
    """``router_class`` with routing capture: route, then record the routing.

    vLLM's modular MoE path calls ``select_experts`` once per layer and forward pass with
    the layer's input and router logits; on CPU it is traced into the compiled graph.
    The gate weights are recorded before ``routed_scaling_factor`` (which DeepSeek's
    routers multiply in when the runner does not). A direct subclass: Python refuses to
    switch an instance to a class with a second base (its object layout differs).
    """

    class TracedRouter(router_class):  # type: ignore[misc, valid-type]
        moe_prune_slot: int
        moe_prune_recorder: RoutingRecorder

        def select_experts(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *args, **kwargs):
            weights, ids = super().select_experts(hidden_states, router_logits, *args, **kwargs)
            recorder, slot = self.moe_prune_recorder, self.moe_prune_slot
            scale = getattr(self, "routed_scaling_factor", 1.0)
            recorder.record(
                slot,
                hidden_states,
                router_logits[:, : recorder.routed[slot]],  # a fused shared-expert gate may follow
                weights if scale == 1.0 else weights / scale,
                ids,
            )
            return weights, ids

    TracedRouter.__name__ = TracedRouter.__qualname__ = f"Traced{router_class.__name__}"
    return TracedRouter


def _make_pruned_class(model_type: str) -> type[nn.Module]:
    binding = BINDINGS[model_type]
    family = FAMILIES[model_type]
    module = importlib.import_module(binding.module)
    base: type[nn.Module] = getattr(module, binding.model_class)
    base_layer: type[nn.Module] = getattr(module, binding.layer_class)

    class PrunedModel(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            from vllm.model_executor.models.utils import extract_layer_index
            from vllm.platforms import current_platform

            if vllm_config.parallel_config.pipeline_parallel_size > 1:
                raise ValueError(
                    "pipeline parallelism is not supported by the moe_prune model classes (routing is counted "
                    "over every MoE layer at once); use tensor parallelism (--tensor-parallel-size) instead"
                )
            if vllm_config.parallel_config.data_parallel_size > 1:
                raise ValueError(
                    "data parallelism is not supported by the moe_prune model classes (vLLM's MoE layers route "
                    "the tokens of every data-parallel rank together, so each rank would count them all); run "
                    "one server per replica: their trace shards merge (`vllm-moe-prune plan --traces` reads them all)"
                )
            _set_inductor_order(vllm_config)
            config = vllm_config.model_config.hf_text_config
            shape = MoEShape.from_config(config.to_dict())
            counts = experts_per_layer(config, shape)

            base_init = base_layer.__init__

            def counted_init(layer_self, *args, prefix: str = "", **kwargs) -> None:
                count = counts.get(extract_layer_index(prefix), shape.num_experts)
                with _expert_count(config, family.experts_keys, count):
                    base_init(layer_self, *args, prefix=prefix, **kwargs)

            # vLLM's model classes refer to their decoder-layer class in several ways
            # (globals, default arguments, isinstance checks); wrapping its __init__ for
            # the duration of construction reaches all of them and changes no type.
            base_layer.__init__ = counted_init
            try:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            finally:
                base_layer.__init__ = base_init

            self.moe_prune_shape = shape
            self.moe_prune_counts = counts
            self.moe_prune_held = held_expert_counts(config.to_dict(), shape)
            sampling = SampleSettings.from_env()
            recorder = RoutingRecorder(
                shape,
                config.hidden_size,
                vllm_config.scheduler_config.max_num_batched_tokens,
                routed=[counts[layer] for layer in shape.moe_layers],
                held=[self.moe_prune_held[layer] for layer in shape.moe_layers],
                sample_capacity=sampling.capacity,
                # Counting several steps together needs Python state a CUDA graph would not replay.
                count_batch_tokens=COUNT_BATCH_TOKENS if current_platform.is_cpu() else 0,
            )
            self.moe_prune_recorder = recorder
            self.moe_prune_first_pass_done = False
            self.moe_prune_compile_check = CompileCheck.for_model(
                compiled=not getattr(self.model, "do_not_compile", True),
                reordering=vllm_config.compilation_config.inductor_compile_config.get("reorder_for_peak_memory", True),
            )
            if sampling.capacity:
                recorder.set_sample_rate(sampling.rate)
            for slot, (_, block) in enumerate(self.moe_prune_blocks()):
                router = block.experts.router
                router.__class__ = _traced_router_class(type(router))
                router.moe_prune_slot = slot
                # A plain attribute, not a submodule: the recorder belongs to the model.
                object.__setattr__(router, "moe_prune_recorder", recorder)

        def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args, **kwargs):
            """vLLM's forward (compiled inside), then this step's routing counted for all layers."""
            if not self.moe_prune_first_pass_done:
                self._moe_prune_first_pass()
            if self.moe_prune_compile_check.pending and _serves_tokens():
                hidden_states = self._moe_prune_checked_forward(input_ids, positions, *args, **kwargs)
            else:
                hidden_states = super().forward(input_ids, positions, *args, **kwargs)
            self.moe_prune_recorder.count(positions.shape[-1])
            return hidden_states

        def _moe_prune_checked_forward(self, *args, **kwargs) -> torch.Tensor:
            """One step through the compiled model and again eagerly; the eager result, and
            eager steps from then on, if the compiled one differs (see compile_check.py).

            The eager run goes second: it leaves its own keys and values in the KV cache
            and its routing in the recorder, and the compiled run's routing is undone."""
            from vllm.forward_context import get_forward_context

            check = self.moe_prune_compile_check
            with self.moe_prune_recorder.discarding_writes():
                compiled = super().forward(*args, **kwargs).clone()
            context = get_forward_context()
            context.skip_compiled = True
            try:
                eager = super().forward(*args, **kwargs)
            finally:
                context.skip_compiled = False
            if check.judge(compiled, eager):
                logger.info(
                    "The compiled model's first served step equals the eager model's (relative error %.2g)",
                    check.relative_error,
                )
                return compiled
            self.model.do_not_compile = True
            logger.error(
                "The compiled model computes something else than the eager model (relative error %.3g, tolerance "
                "%.1g): this engine runs eagerly from now on, correct but slower. %s.",
                check.relative_error, check.tolerance, check.remedy,
            )
            return eager

        def _moe_prune_first_pass(self) -> None:
            """Set capture up against the engine, at the first forward pass (vLLM's profiling
            run), before vLLM compiles or captures the model.

            The recorder follows the model runner's padding mask. MoE kernels that route
            inside the kernel are refused: their router is never called, so nothing would
            be counted. They are known only once the kernels are chosen, so this is where
            the engine fails at start-up, not silently."""
            from vllm.forward_context import get_forward_context, is_forward_context_available

            if is_forward_context_available():
                self.moe_prune_recorder.follow_padding_mask(get_forward_context().is_padding)
            for layer, block in self.moe_prune_blocks():
                if block.experts.is_monolithic:
                    method = type(block.experts.routed_experts.quant_method).__name__
                    raise RuntimeError(
                        f"MoE layer {layer} runs a monolithic MoE kernel ({method}) that routes inside the kernel; "
                        "routing capture needs vLLM's modular MoE path, where the router selects experts "
                        "(choose another MoE backend)"
                    )
            self.moe_prune_first_pass_done = True

        def moe_prune_blocks(self) -> Iterator[tuple[int, nn.Module]]:
            """(decoder layer index, MoE block) of every MoE layer, in slot order."""
            for layer in self.moe_prune_shape.moe_layers:
                yield layer, getattr(self.model.layers[layer], binding.moe_attr)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            return super().load_weights(self._moe_prune_remap(iter(weights)))

        def _moe_prune_remap(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            """Renumber kept experts and slice routers; the kept ids arrive first.

            Without kept ids (the stock loader, e.g. tracing a full model or serving an
            export) every expert the checkpoint holds is kept, and a model built smaller
            than its checkpoint (a plan's counts without the plan) refuses to load.
            """
            kept: dict[int, list[int]] = {}
            layout: PrunedLayout | None = None
            recorder = self.moe_prune_recorder
            slots = {layer: slot for slot, layer in enumerate(self.moe_prune_shape.moe_layers)}
            for name, tensor in weights:
                if name.startswith(KEPT_TENSOR_PREFIX):
                    kept[int(name[len(KEPT_TENSOR_PREFIX):])] = tensor.tolist()
                    continue
                if layout is None:
                    layout = self._moe_prune_layout(kept)
                remap = layout.remap(name)
                if remap is None:
                    continue
                layer = layout.router_layer(name)
                if layer is not None:
                    recorder.set_router(slots[layer], tensor, layout.kept[layer])
                yield remap.name, remap.apply(tensor)

        def _moe_prune_layout(self, kept: dict[int, list[int]]) -> PrunedLayout:
            shape = self.moe_prune_shape
            if not kept:
                held = self.moe_prune_held
                pruned = [layer for layer, n in self.moe_prune_counts.items() if n != held[layer]]
                if pruned:
                    raise ValueError(
                        f"MoE layers {pruned} are built pruned, but no plan reached the weights: "
                        "serve with --load-format moe_prune and the plan (see `vllm-moe-prune serve-args`)"
                    )
                kept = {layer: list(range(n)) for layer, n in held.items()}
            for layer, ids in kept.items():
                if len(ids) != self.moe_prune_counts[layer]:
                    raise ValueError(
                        f"MoE layer {layer}: the plan keeps {len(ids)} experts but the model was built with "
                        f"{self.moe_prune_counts[layer]}"
                    )
            return PrunedLayout(shape, kept)

    PrunedModel.__name__ = PrunedModel.__qualname__ = family.pruned_architecture
    return PrunedModel


#: Built lazily by ``vllm.ModelRegistry`` through the "module:attr" string form.
def __getattr__(name: str) -> type[nn.Module]:
    for model_type, family in FAMILIES.items():
        if name == family.pruned_architecture and model_type in BINDINGS:
            cls = _make_pruned_class(model_type)
            globals()[name] = cls
            return cls
    raise AttributeError(name)
