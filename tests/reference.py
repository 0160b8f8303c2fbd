"""Reference semantics of a pruned model, computed with plain transformers.

Every equivalence test of the project (plugin loader, exporter, serving) compares against
:func:`pruned_reference_logprobs`. The PRUNED model is defined as the original model in
which, in every MoE layer, the router may only choose kept experts:

* softmax routers (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2): the router logits
  of pruned experts are set to ``-inf`` before the softmax, i.e. the softmax runs over the
  kept rows only; top-k is taken among the kept experts; the top-k weights are
  renormalised iff the family renormalises (:meth:`MoEFamily.renormalises`). DeepSeek-V2
  then applies its own group-limited greedy selection (group score = max softmax score of
  the group's kept experts) and ``routed_scaling_factor``, exactly as transformers does;
* DeepSeek-V3 (sigmoid scores, ``e_score_correction_bias``, grouped top-k): the
  selection score ``sigmoid(logit) + bias`` of pruned experts is ``-inf``; kept experts
  keep their score and bias; a group's score is the sum of its two best kept experts
  (so every group needs at least two kept experts); the gate weights are the kept
  experts' sigmoid scores, renormalised over the top-k and scaled as in transformers.
  Implemented by setting the pruned entries of ``e_score_correction_bias`` to ``-inf``,
  which makes transformers' own router compute exactly that;
* shared experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``) are untouched.

This is what a physically pruned checkpoint (router rows sliced, kept experts renumbered
in ascending order) computes, which ``tests/test_reference.py`` checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vllm_moe_prune.families import MoEShape
from vllm_moe_prune.plan import validate_kept
from vllm_moe_prune.testbed.families import make_tiny_checkpoint


def tiny_checkpoint(family: str, root: Path, seed: int = 0) -> Path:
    """``root/family-seed``: the tiny checkpoint of ``family``, created on first use."""
    path = Path(root) / f"{family}-{seed}"
    return path if path.exists() else make_tiny_checkpoint(family, path, seed)


def _softmax_route(logits: torch.Tensor, kept: torch.Tensor, top_k: int, renormalise: bool):
    """Mixtral / OLMoE / Qwen-MoE routing restricted to ``kept`` (bool mask over experts)."""
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def _deepseek_v2_route(router: nn.Module, logits: torch.Tensor, kept: torch.Tensor):
    """transformers' DeepSeek-V2 routing with the softmax restricted to ``kept``."""
    scores = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        num_experts = scores.shape[-1]
        grouped = scores.view(-1, router.num_group, num_experts // router.num_group)
        group_idx = torch.topk(grouped.max(dim=-1).values, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros(grouped.shape[:2], dtype=torch.bool).scatter_(1, group_idx, True)
        scores = scores.masked_fill(~group_mask.repeat_interleave(num_experts // router.num_group, dim=1), 0.0)
    elif router.topk_method != "greedy":
        raise NotImplementedError(f"DeepSeek-V2 topk_method {router.topk_method!r}")
    weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return weights * router.routed_scaling_factor, indices


def restrict_routing(model: nn.Module, shape: MoEShape, kept: dict[int, list[int]]) -> None:
    """Make ``model`` (a transformers MoE model) the pruned model defined above, in place."""
    model_type = shape.family.model_type
    for layer in shape.moe_layers:
        router = model.model.layers[layer].mlp.gate
        mask = torch.zeros(shape.num_experts, dtype=torch.bool)
        mask[kept[layer]] = True
        if model_type == "deepseek_v3":
            with torch.no_grad():
                router.e_score_correction_bias.masked_fill_(~mask, float("-inf"))
            continue

        def hook(module, args, output, mask=mask):
            logits = output[0]
            if model_type == "deepseek_v2":
                weights, indices = _deepseek_v2_route(module, logits, mask)
            else:
                weights, indices = _softmax_route(logits, mask, shape.top_k, shape.renormalise)
            return logits, weights, indices

        router.register_forward_hook(hook)


def load_float32(model_dir: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def logprobs(model: nn.Module, prompts_token_ids: list[list[int]]) -> list[torch.Tensor]:
    """Per-position log-probabilities ``[len(prompt), vocab]`` of each prompt, one at a time."""
    return [model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1) for ids in prompts_token_ids]


def pruned_reference_logprobs(
    model_dir: str | Path, kept: dict[int, list[int]] | None, prompts_token_ids: list[list[int]]
) -> list[torch.Tensor]:
    """Log-probabilities of the pruned model (``kept``: original ids per MoE layer).

    ``kept=None`` is the unmodified model.
    """
    model = load_float32(model_dir)
    if kept is not None:
        shape = MoEShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
        validate_kept(shape, kept)
        restrict_routing(model, shape, kept)
    return logprobs(model, prompts_token_ids)
