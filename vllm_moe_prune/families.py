"""What the project needs to know about each supported MoE family, in one place.

The loader, the exporter, calibration, capture and the tests all ask the same questions
of a checkpoint: which decoder layers are MoE, how many routed experts and what top-k,
does the router renormalise its top-k weights, and under which tensor names do the
router and each routed expert live. :class:`MoEFamily` answers them from a plain
``config.json`` dict, so this module needs neither vLLM nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vllm_moe_prune.errors import UserError

Config = dict[str, Any]


class UnsupportedModelError(UserError):
    """The checkpoint is not one of the MoE families this project supports."""


def _first(config: Config, keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise UnsupportedModelError(f"config.json has no {what} (looked for {', '.join(keys)})")


def _every_layer(config: Config) -> list[int]:
    return list(range(config["num_hidden_layers"]))


def _qwen_sparse_layers(config: Config) -> list[int]:
    step = config.get("decoder_sparse_step", 1) or 1
    dense = set(config.get("mlp_only_layers") or [])
    return [i for i in range(config["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]


def _deepseek_layers(config: Config) -> list[int]:
    first = config.get("first_k_dense_replace", 0) or 0
    freq = config.get("moe_layer_freq", 1) or 1
    return [i for i in range(config["num_hidden_layers"]) if i >= first and i % freq == 0]


@dataclass(frozen=True)
class MoEFamily:
    """Static description of one MoE architecture family.

    ``router`` and ``expert`` are name templates relative to the checkpoint root, with
    ``{layer}`` and ``{expert}`` placeholders; ``expert_parts`` are the tensors of one
    routed expert (``{expert_prefix}{part}``). ``router_extras`` are per-expert router
    vectors that must be sliced with the router rows (DeepSeek-V3's score bias).
    """

    model_type: str
    architecture: str
    experts_keys: tuple[str, ...]
    router: str
    expert: str
    expert_parts: tuple[str, ...]
    moe_layers: Callable[[Config], list[int]]
    renormalise_default: bool
    renormalise_key: str | None = "norm_topk_prob"
    router_extras: tuple[str, ...] = ()
    shared_expert_prefixes: tuple[str, ...] = ()

    @property
    def pruned_architecture(self) -> str:
        """Name under which the plugin registers this family's prunable, traceable class."""
        return f"MoePrune{self.architecture}"

    def num_experts(self, config: Config) -> int:
        return int(_first(config, self.experts_keys, "routed expert count"))

    def top_k(self, config: Config) -> int:
        return int(_first(config, ("num_experts_per_tok",), "top-k (num_experts_per_tok)"))

    def renormalises(self, config: Config) -> bool:
        """Whether the top-k gate weights are renormalised to sum to one."""
        if self.renormalise_key is None:
            return self.renormalise_default
        value = config.get(self.renormalise_key)
        return self.renormalise_default if value is None else bool(value)

    def num_groups(self, config: Config) -> int:
        """Expert groups of grouped top-k routing (DeepSeek); 1 elsewhere."""
        return int(config.get("n_group") or 1) if self.model_type.startswith("deepseek") else 1

    def topk_groups(self, config: Config) -> int:
        """Groups a token may pick experts from under grouped top-k routing (DeepSeek)."""
        return int(config.get("topk_group") or 1) if self.model_type.startswith("deepseek") else 1

    def scoring(self, config: Config) -> str:
        """``softmax`` or ``sigmoid``: how router logits become expert scores.

        transformers scores DeepSeek-V3 with a sigmoid whatever the config says; the
        released V3 configs say so too, which is what vLLM follows.
        """
        if self.model_type == "deepseek_v3":
            return "sigmoid"
        return str(config.get("scoring_func") or "softmax") if self.model_type == "deepseek_v2" else "softmax"

    def group_score(self, config: Config) -> str:
        """How a group is ranked: its best expert (``max``) or its best two (``top2_sum``, V3)."""
        return "top2_sum" if self.model_type == "deepseek_v3" else "max"

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def router_extra_names(self, layer: int) -> list[str]:
        return [extra.format(layer=layer) for extra in self.router_extras]

    def expert_prefix(self, layer: int, expert: int) -> str:
        return self.expert.format(layer=layer, expert=expert)

    def expert_tensor_names(self, layer: int, expert: int) -> list[str]:
        prefix = self.expert_prefix(layer, expert)
        return [prefix + part for part in self.expert_parts]


_QWEN_EXPERT = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        MoEFamily(
            model_type="qwen3_moe",
            architecture="Qwen3MoeForCausalLM",
            experts_keys=("num_experts", "num_local_experts"),
            router="model.layers.{layer}.mlp.gate.weight",
            expert="model.layers.{layer}.mlp.experts.{expert}.",
            expert_parts=_QWEN_EXPERT,
            moe_layers=_qwen_sparse_layers,
            renormalise_default=False,
        ),
        MoEFamily(
            model_type="qwen2_moe",
            architecture="Qwen2MoeForCausalLM",
            experts_keys=("num_experts", "num_local_experts"),
            router="model.layers.{layer}.mlp.gate.weight",
            expert="model.layers.{layer}.mlp.experts.{expert}.",
            expert_parts=_QWEN_EXPERT,
            moe_layers=_qwen_sparse_layers,
            renormalise_default=False,
            shared_expert_prefixes=("mlp.shared_expert.", "mlp.shared_expert_gate."),
        ),
        MoEFamily(
            model_type="mixtral",
            architecture="MixtralForCausalLM",
            experts_keys=("num_local_experts", "num_experts"),
            router="model.layers.{layer}.block_sparse_moe.gate.weight",
            expert="model.layers.{layer}.block_sparse_moe.experts.{expert}.",
            expert_parts=("w1.weight", "w3.weight", "w2.weight"),
            moe_layers=_every_layer,
            renormalise_default=True,
            renormalise_key=None,
        ),
        MoEFamily(
            model_type="olmoe",
            architecture="OlmoeForCausalLM",
            experts_keys=("num_experts", "num_local_experts"),
            router="model.layers.{layer}.mlp.gate.weight",
            expert="model.layers.{layer}.mlp.experts.{expert}.",
            expert_parts=_QWEN_EXPERT,
            moe_layers=_every_layer,
            renormalise_default=False,
        ),
        # Tensor names checked against what transformers 5.19 writes for both versions.
        # transformers' DeepSeek-V2 router never renormalises; vLLM follows norm_topk_prob
        # (false in the released V2 configs, so both agree there).
        MoEFamily(
            model_type="deepseek_v2",
            architecture="DeepseekV2ForCausalLM",
            experts_keys=("n_routed_experts",),
            router="model.layers.{layer}.mlp.gate.weight",
            expert="model.layers.{layer}.mlp.experts.{expert}.",
            expert_parts=_QWEN_EXPERT,
            moe_layers=_deepseek_layers,
            renormalise_default=False,
            shared_expert_prefixes=("mlp.shared_experts.",),
        ),
        MoEFamily(
            model_type="deepseek_v3",
            architecture="DeepseekV3ForCausalLM",
            experts_keys=("n_routed_experts",),
            router="model.layers.{layer}.mlp.gate.weight",
            expert="model.layers.{layer}.mlp.experts.{expert}.",
            expert_parts=_QWEN_EXPERT,
            moe_layers=_deepseek_layers,
            renormalise_default=True,
            router_extras=("model.layers.{layer}.mlp.gate.e_score_correction_bias",),
            shared_expert_prefixes=("mlp.shared_experts.",),
        ),
    )
}


def family_of(config: Config) -> MoEFamily:
    """The family of a checkpoint's ``config.json``, or a clear refusal."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported MoE families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


@dataclass(frozen=True)
class MoEShape:
    """The routing shape of one checkpoint: what every statistic and plan is indexed by."""

    family: MoEFamily
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    renormalise: bool
    num_groups: int
    topk_groups: int = 1
    scoring: str = "softmax"
    group_score: str = "max"

    @property
    def min_kept_per_group(self) -> int:
        """Fewest experts a group may keep under grouped routing (1 without groups).

        A token picks its top_k experts inside ``topk_groups`` groups, so each group needs
        ``ceil(top_k / topk_groups)``; groups ranked by their two best experts (V3) need 2.
        """
        if self.num_groups == 1:
            return 1
        return max(-(-self.top_k // self.topk_groups), 2 if self.group_score == "top2_sum" else 1)

    @classmethod
    def from_config(cls, config: Config) -> "MoEShape":
        family = family_of(config)
        layers = tuple(family.moe_layers(config))
        if not layers:
            raise UnsupportedModelError("config.json describes no MoE layer")
        return cls(
            family=family,
            moe_layers=layers,
            num_experts=family.num_experts(config),
            top_k=family.top_k(config),
            renormalise=family.renormalises(config),
            num_groups=family.num_groups(config),
            topk_groups=family.topk_groups(config),
            scoring=family.scoring(config),
            group_score=family.group_score(config),
        )
