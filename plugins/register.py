"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine core, each
worker, the model-inspection subprocess), possibly more than once: it must be cheap and
idempotent. Model classes are registered in vLLM's lazy "module:Class" form, so nothing
heavy is imported until a model of ours is actually built.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from vllm_moe_prune.families import FAMILIES

    from . import loader  # noqa: F401  (registers --load-format moe_prune)
    from .models import BINDINGS

    for model_type in BINDINGS:
        name = FAMILIES[model_type].pruned_architecture
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"vllm_moe_prune_plugins.models:{name}")
    _registered = True
