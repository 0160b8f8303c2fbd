"""Budget parsing and exact conversion to expert counts, on synthetic sizes and a real checkpoint."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

import pytest
import torch

from vllm_moe_prune.budget import (
    Budget,
    BudgetError,
    ConstraintError,
    Constraints,
    budget_for_checkpoint,
    parse_budget,
    resolve_budget,
)
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.methods import METHODS
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.stats import RoutingStats

torch.set_num_threads(1)


# --- parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("0.01GiB", "memory", 10737418),  # floor(0.01 * 2**30)
        ("512MiB", "memory", 512 * 2**20),
        ("1.5 GB", "memory", 1_500_000_000),
        ("64kib", "memory", 65536),
        ("123456789B", "memory", 123456789),
        ("1000bytes", "memory", 1000),
        ("5e9B", "memory", 5_000_000_000),
        ("2.5E-1", "share", Fraction(1, 4)),
        ("50%", "share", Fraction(1, 2)),
        ("12.5%", "share", Fraction(1, 8)),
        ("0.25", "share", Fraction(1, 4)),
        ("1", "share", Fraction(1)),
        ("8/layer", "per_layer", 8),
        (" 6 / layers ", "per_layer", 6),
    ],
)
def test_parse_budget_forms(text, kind, value):
    spec = parse_budget(text)
    assert (spec.kind, spec.value) == (kind, value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2", "ambiguous"),
        ("150%", r"\(0, 100%\]"),
        ("0%", r"\(0, 100%\]"),
        ("0/layer", "at least one"),
        ("10XB", "unknown unit"),
        ("0GiB", "empty"),
        ("lots", "cannot read"),
    ],
)
def test_parse_budget_refuses(text, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(text)


# --- conversion on synthetic sizes ---------------------------------------------------

LAYERS = [1, 2, 3, 4]
E = 8


def sizes(per_expert: int = 100) -> list[list[int]]:
    return [[per_expert] * E for _ in LAYERS]


def test_share_converts_exactly():
    budget = resolve_budget("50%", sizes(), Constraints(top_k=2), LAYERS)
    assert budget == Budget(total=16, per_layer=4, spec="50%", max_kept_bytes=1600)
    # 30% of 3200 bytes = 960 bytes: 9 experts overall, 2 per layer uniformly.
    budget = resolve_budget("0.3", sizes(), Constraints(top_k=2), LAYERS)
    assert (budget.total, budget.per_layer) == (9, 2)


def test_memory_budget_counts_dense_weights():
    dense = 10_000
    budget = resolve_budget(f"{dense + 1299}B", sizes(), Constraints(top_k=1), LAYERS, dense_bytes=dense)
    assert (budget.total, budget.per_layer, budget.max_kept_bytes) == (12, 3, 1299)


def test_per_layer_budget():
    budget = resolve_budget("3/layer", sizes(), Constraints(top_k=2), LAYERS)
    assert (budget.total, budget.per_layer, budget.max_kept_bytes) == (12, 3, None)
    with pytest.raises(BudgetError, match="only 8 experts"):
        resolve_budget("9/layer", sizes(), Constraints(top_k=2), LAYERS)
    with pytest.raises(BudgetError, match="smallest feasible budget is 2/layer"):
        resolve_budget("1/layer", sizes(), Constraints(top_k=2), LAYERS)


def test_budget_above_the_model_keeps_everything():
    budget = resolve_budget("1TiB", sizes(), Constraints(top_k=2), LAYERS)
    assert (budget.total, budget.per_layer) == (32, 8)


def test_groups_round_down_to_whole_groups():
    constraints = Constraints(top_k=2, num_groups=2)
    # 5.5 experts per layer of bytes: uniform 4 (multiple of 2), global 22 experts.
    budget = resolve_budget(f"{22 * 100 + 50}B", sizes(), constraints, LAYERS)
    assert (budget.total, budget.per_layer) == (22, 4)
    with pytest.raises(BudgetError, match="multiples of 2"):
        resolve_budget("3/layer", sizes(), constraints, LAYERS)


def test_pinned_layers_and_experts_count_against_the_budget():
    constraints = Constraints(top_k=2, pinned_experts={2: [0, 1, 2]}, pinned_layers=frozenset({4}))
    assert constraints.min_experts(2, E) == 3 and constraints.min_experts(4, E) == 8
    # 60% = 1920 bytes: layer 4 whole (800) + 3 pins (300) + 3 layers x r others -> r = 3;
    # globally the floors 2 + 3 + 2 take 1500 bytes, leaving room for 4 more experts.
    budget = resolve_budget("60%", sizes(), constraints, LAYERS)
    assert (budget.total, budget.per_layer) == (8 + 7 + 4, 3)
    # 50% = 1600 bytes: no uniform count fits (r = 3 needs 1700 = 53.125%), a global one does.
    with pytest.raises(BudgetError, match=r"smallest feasible budget is 53.13%"):
        resolve_budget("50%", sizes(), constraints, LAYERS)
    global_budget = resolve_budget("50%", sizes(), constraints, LAYERS, uniform=False)
    assert (global_budget.total, global_budget.per_layer) == (16, None)
    with pytest.raises(BudgetError, match=r"smallest feasible budget is 46.88%"):
        resolve_budget("40%", sizes(), constraints, LAYERS, uniform=False)


def worst_case_bytes(expert_bytes, constraints, total):
    """Most bytes any valid choice of ``total`` experts can take: floors then the largest left."""
    fixed, floors, pool, count = 0, 0, [], 0
    for layer, row in zip(LAYERS, expert_bytes, strict=True):
        pins = constraints.pinned_in(layer)
        free = sorted((s for e, s in enumerate(row) if e not in pins), reverse=True)
        need = constraints.min_experts(layer, len(row)) - len(pins)
        fixed += sum(row[e] for e in pins)
        floors += sum(free[:need])
        pool += free[need:]
        count += len(pins) + need
    return fixed + floors + sum(sorted(pool, reverse=True)[: total - count])


def test_mixed_sizes_never_exceed_bytes():
    """With unequal experts, whichever counted experts a method picks, the bytes fit."""
    mixed = [[100, 300, 100, 100, 200, 100, 100, 100], [50] * 8, [100] * 8, [400] + [100] * 7]
    constraints = Constraints(top_k=2, pinned_experts={1: [1]})
    for limit in range(1600, 4800, 37):
        budget = resolve_budget(f"{limit}B", mixed, constraints, LAYERS)
        worst_uniform = sum(
            sum(row[e] for e in constraints.pinned_in(layer))
            + sum(
                sorted((s for e, s in enumerate(row) if e not in constraints.pinned_in(layer)), reverse=True)[
                    : budget.per_layer - len(constraints.pinned_in(layer))
                ]
            )
            for layer, row in zip(LAYERS, mixed, strict=True)
        )
        assert worst_uniform <= budget.max_kept_bytes == limit
        assert worst_case_bytes(mixed, constraints, budget.total) <= limit


def test_smallest_feasible_budget_is_named_and_works():
    dense = 3 * 2**20
    with pytest.raises(BudgetError) as info:
        resolve_budget("0.001GiB", sizes(2**16), Constraints(top_k=2), LAYERS, dense_bytes=dense)
    smallest = re.search(r"smallest feasible budget is (\S+GiB)", str(info.value)).group(1)
    needed = dense + 4 * 2 * 2**16
    assert parse_budget(smallest).value >= needed > parse_budget("0.001GiB").value
    assert resolve_budget(smallest, sizes(2**16), Constraints(top_k=2), LAYERS, dense_bytes=dense).per_layer == 2


def test_dense_weights_alone_exceed_the_budget():
    with pytest.raises(BudgetError, match="dense weights take"):
        resolve_budget("1MB", sizes(), Constraints(top_k=2), LAYERS, dense_bytes=2_000_000)


def test_constraints_are_validated():
    with pytest.raises(ConstraintError, match="not MoE layers"):
        resolve_budget("50%", sizes(), Constraints(top_k=2, pinned_layers=frozenset({9})), LAYERS)
    with pytest.raises(ConstraintError, match="out of range"):
        resolve_budget("50%", sizes(), Constraints(top_k=2, pinned_experts={1: [8]}), LAYERS)
    with pytest.raises(ConstraintError, match="equal routing groups"):
        resolve_budget("50%", sizes(), Constraints(top_k=2, num_groups=3), LAYERS)


# --- a real checkpoint ---------------------------------------------------------------

HIDDEN, MOE_INTERMEDIATE = 64, 32


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        moe_intermediate_size=MOE_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp(request.param)
    Qwen3MoeForCausalLM(config).to(getattr(torch, request.param)).save_pretrained(path)
    return Checkpoint.open(path)


def test_checkpoint_budget_is_dtype_aware_and_exact(checkpoint):
    itemsize = 4 if checkpoint.tensors["lm_head.weight"].dtype == "F32" else 2
    expert = 3 * HIDDEN * MOE_INTERMEDIATE * itemsize
    assert checkpoint.expert_bytes == [[expert] * 8, [expert] * 8]
    dense = checkpoint.total_bytes - checkpoint.routed_expert_bytes

    exact = budget_for_checkpoint(f"{dense + 2 * 5 * expert}B", checkpoint)
    assert (exact.total, exact.per_layer) == (10, 5)
    short = budget_for_checkpoint(f"{dense + 2 * 5 * expert - 1}B", checkpoint)
    assert (short.total, short.per_layer) == (9, 4)
    assert budget_for_checkpoint("50%", checkpoint).per_layer == 4

    # Binary units convert exactly too: dense + 6 experts, written in MiB.
    mib = Decimal(dense + 6 * expert) / Decimal(2**20)
    assert (
        budget_for_checkpoint(f"{mib}MiB", checkpoint).total,
        budget_for_checkpoint(f"{mib}MiB", checkpoint).per_layer,
    ) == (6, 3)


def test_checkpoint_plan_stays_within_memory_budget(checkpoint):
    dense = checkpoint.total_bytes - checkpoint.routed_expert_bytes
    limit = dense + checkpoint.routed_expert_bytes * 0.6
    budget = budget_for_checkpoint(f"{limit / 2**30:.9f}GiB", checkpoint)
    stats = RoutingStats.zeros(checkpoint.shape.moe_layers, 8, 2)
    stats.tokens = 4
    stats.counts[:, :4] = 2
    stats.transitions[0, 0, 0] = 16
    constraints = Constraints.for_shape(checkpoint.shape)
    kept = METHODS["frequency"].fn(stats, None, budget, constraints)
    plan = Plan.for_checkpoint(checkpoint, kept, "frequency")
    assert plan.predicted["weight_bytes"] <= limit
    assert plan.experts_per_layer == {0: 4, 1: 4}


def test_checkpoint_smallest_feasible_in_users_unit(checkpoint):
    with pytest.raises(BudgetError) as info:
        budget_for_checkpoint("0.00001GiB", checkpoint)
    smallest = re.search(r"smallest feasible budget is (\S+)GiB", str(info.value)).group(1)
    budget = budget_for_checkpoint(f"{smallest}GiB", checkpoint)
    assert budget.per_layer == 2  # top_k
