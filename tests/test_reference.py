"""The pruned-model reference (tests/reference.py) against independent computations."""

from __future__ import annotations

import pytest
import torch

from reference import load_float32, logprobs, pruned_reference_logprobs, tiny_checkpoint
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.export import export_pruned
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.testbed.families import FAMILY_NAMES

#: Random token ids (BOS first), long enough that every expert of every layer is routed to.
PROMPTS = [[0] + torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (48, 31)]


def uniform_kept(ckpt: Checkpoint, per_group: int, shift: int) -> dict[int, list[int]]:
    """Keep ``per_group`` experts of every routing group (one group outside DeepSeek), a
    different selection in every layer so renumbering mistakes cannot cancel out."""
    shape = ckpt.shape
    size = shape.num_experts // shape.num_groups
    kept = {}
    for i, layer in enumerate(shape.moe_layers):
        kept[layer] = sorted(
            g * size + (j + i + shift) % size for g in range(shape.num_groups) for j in range(per_group)
        )
    return kept


def per_group_for_pruning(ckpt: Checkpoint) -> int:
    """Experts kept per group for a ~25-50% pruned plan that every family can route."""
    shape = ckpt.shape
    size = shape.num_experts // shape.num_groups
    if shape.family.model_type == "deepseek_v3":
        return max(2, size - 1)  # its group score sums the two best experts of a group
    return max(1, size * 3 // 4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_all_kept_is_the_unmodified_model(tiny_root, family):
    model_dir = tiny_checkpoint(family, tiny_root)
    shape = Checkpoint.open(model_dir).shape
    everything = {layer: list(range(shape.num_experts)) for layer in shape.moe_layers}
    restricted = pruned_reference_logprobs(model_dir, everything, PROMPTS)
    plain = pruned_reference_logprobs(model_dir, None, PROMPTS)
    for a, b in zip(restricted, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_uniform_plan_equals_physically_pruned_checkpoint(tiny_root, tmp_path, family):
    model_dir = tiny_checkpoint(family, tiny_root)
    ckpt = Checkpoint.open(model_dir)
    kept = uniform_kept(ckpt, per_group_for_pruning(ckpt), shift=1)
    plan = Plan.for_checkpoint(ckpt, kept, method="test")
    exported = export_pruned(model_dir, plan, tmp_path / "pruned")
    assert Checkpoint.open(exported).shape.num_experts == len(kept[ckpt.shape.moe_layers[0]])

    reference = pruned_reference_logprobs(model_dir, kept, PROMPTS)
    physical = logprobs(load_float32(exported), PROMPTS)
    unpruned = pruned_reference_logprobs(model_dir, None, PROMPTS)
    for ref, phys, full in zip(reference, physical, unpruned):
        # Not bit-identical: the router softmax reduces over 8 entries (two of them zero)
        # instead of 6, a float32 rounding difference on log-probabilities of size ~10.
        torch.testing.assert_close(phys, ref, atol=1e-5, rtol=1e-5)
        # The comparison above can fail: pruning these experts clearly changes the output.
        assert (ref - full).abs().max() > 0.1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_expert_matters(tiny_root, family):
    """The testbed's large init makes each expert count: zeroing one changes the output."""
    model = load_float32(tiny_checkpoint(family, tiny_root))
    shape = Checkpoint.open(tiny_checkpoint(family, tiny_root)).shape
    before = logprobs(model, PROMPTS[:1])[0]
    experts = model.model.layers[shape.moe_layers[-1]].mlp.experts
    for expert in range(shape.num_experts):
        saved = experts.down_proj.data[expert].clone()
        experts.down_proj.data[expert] = 0
        after = logprobs(model, PROMPTS[:1])[0]
        experts.down_proj.data[expert] = saved
        assert (after - before).abs().max() > 0.05, f"expert {expert} does not change the output"


def test_reference_rejects_unservable_kept_sets(tiny_root):
    model_dir = tiny_checkpoint("qwen3_moe", tiny_root)
    shape = Checkpoint.open(model_dir).shape
    kept = {layer: [0] for layer in shape.moe_layers}
    with pytest.raises(ValueError, match="fewer than top_k"):
        pruned_reference_logprobs(model_dir, kept, PROMPTS)
