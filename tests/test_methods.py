"""Planning methods on small constructed statistics whose answers are known by hand."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch

from vllm_moe_prune.budget import Budget, BudgetError, ConstraintError, Constraints, resolve_budget
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.families import FAMILIES, MoEShape
from vllm_moe_prune.methods import CALIBRATION, METHODS, ROUTING, get_method
from vllm_moe_prune.methods.common import group_rows, keep_global
from vllm_moe_prune.methods.enumeration import RemovalScorer, best_subset, greedy_removal
from vllm_moe_prune.methods.mosaic import mosaic, spearman_distance
from vllm_moe_prune.methods.pathfinder import k_best_path_counts, pathfinder, tukey_outliers
from vllm_moe_prune.plan import validate_kept
from vllm_moe_prune.signals import CalibrationSignals, LayerSignals, SignalsError, moe_output, reconstruction_error
from vllm_moe_prune.stats import RoutingStats, StatsError

torch.set_num_threads(1)


# --- helpers -------------------------------------------------------------------------


def reference_output(logits, outs, subset, top_k, renormalise) -> torch.Tensor:
    """Token by token in plain Python: what a router sliced to ``subset`` computes."""
    rows = []
    for t in range(logits.shape[0]):
        z = sum(math.exp(float(logits[t, e])) for e in subset)
        probs = {e: math.exp(float(logits[t, e])) / z for e in subset}
        top = sorted(subset, key=lambda e: -probs[e])[:top_k]
        norm = sum(probs[e] for e in top) if renormalise else 1.0
        rows.append(sum((probs[e] / norm) * outs[t, e].double() for e in top))
    return torch.stack(rows)


def reference_loss(layer: LayerSignals, subset, top_k, renormalise) -> float:
    out = reference_output(layer.router_logits, layer.expert_out, subset, top_k, renormalise)
    return float((out - layer.layer_out.double()).square().sum())


def random_layer(generator, tokens=24, experts=6, hidden=4, top_k=2, renormalise=False, sequences=2, scale=1.0):
    logits = torch.randn(tokens, experts, generator=generator) * scale
    outs = torch.randn(tokens, experts, hidden, generator=generator)
    target = moe_output(logits, outs, range(experts), top_k, renormalise)
    return LayerSignals(
        logits,
        outs,
        target,
        torch.randn(tokens, hidden, generator=generator),
        torch.arange(tokens) * sequences // tokens,
    )


def stats_of(signals: CalibrationSignals) -> RoutingStats:
    """The routing statistics of the calibration tokens themselves."""
    layers = [signals.layer(i) for i in range(signals.num_layers)]
    stats = RoutingStats.zeros(signals.moe_layers, signals.num_experts, signals.top_k)
    stats.tokens = layers[0].tokens
    chosen = []
    for i, layer in enumerate(layers):
        weights, ids = layer.router_logits.softmax(-1).topk(signals.top_k, dim=-1)
        chosen.append(ids)
        stats.counts[i] = torch.bincount(ids.flatten(), minlength=signals.num_experts)
        stats.prob_sum[i] = layer.router_logits.softmax(-1).double().sum(0)
        stats.gate_sum[i].index_add_(0, ids.flatten(), weights.flatten().double())
    for i in range(len(layers) - 1):
        pairs = (chosen[i][:, :, None] * signals.num_experts + chosen[i + 1][:, None, :]).flatten()
        stats.transitions[i] = torch.bincount(pairs, minlength=signals.num_experts**2).view_as(stats.transitions[i])
    stats.validate()
    return stats


def random_model(seed=0, layers=(1, 2, 4), experts=8, top_k=2, renormalise=True, groups=1, tokens=32):
    generator = torch.Generator().manual_seed(seed)
    signals = CalibrationSignals.from_layers(
        [random_layer(generator, tokens, experts, 4, top_k, renormalise, sequences=4) for _ in layers],
        layers,
        top_k,
        renormalise,
        groups,
    )
    return stats_of(signals), signals


def unit(i: int, size: int) -> torch.Tensor:
    return torch.eye(size)[i]


# --- moe_output: the one definition of a pruned layer --------------------------------


def test_moe_output_by_hand():
    logits = torch.log(torch.tensor([[1.0, 2.0, 5.0]]))  # softmax 1/8, 2/8, 5/8
    outs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    f0, f1, f2 = outs[0]
    torch.testing.assert_close(moe_output(logits, outs, [0, 1, 2], 2, False)[0], 5 / 8 * f2 + 2 / 8 * f1)
    torch.testing.assert_close(moe_output(logits, outs, [0, 1, 2], 2, True)[0], 5 / 7 * f2 + 2 / 7 * f1)
    # Sliced router: softmax over experts 0 and 1 only -> 1/3, 2/3.
    torch.testing.assert_close(moe_output(logits, outs, [0, 1], 2, False)[0], 1 / 3 * f0 + 2 / 3 * f1)
    # Over 0 and 2 -> 1/6, 5/6; top-1 is expert 2, raw 5/6 or renormalised 1.
    torch.testing.assert_close(moe_output(logits, outs, [0, 2], 1, False)[0], 5 / 6 * f2)
    torch.testing.assert_close(moe_output(logits, outs, [2, 0], 1, True)[0], f2)
    batch = moe_output(logits, outs, torch.tensor([[0, 1], [0, 2]]), 1, True)
    torch.testing.assert_close(batch[:, 0], torch.stack([f1, f2]))


@pytest.mark.parametrize("renormalise", [False, True])
def test_moe_output_matches_reference(renormalise):
    layer = random_layer(torch.Generator().manual_seed(1), tokens=10, experts=7, top_k=3, renormalise=renormalise)
    for subset in ([0, 1, 2, 3, 4, 5, 6], [6, 2, 4], [1, 5], [3]):
        ours = moe_output(layer.router_logits, layer.expert_out, subset, 3, renormalise)
        torch.testing.assert_close(
            ours.double(), reference_output(layer.router_logits, layer.expert_out, subset, 3, renormalise)
        )
    errors = reconstruction_error(layer, torch.tensor([[0, 1, 2], [2, 4, 6]]), 3, renormalise)
    assert errors.shape == (2, 10)
    assert errors[1].sum().item() == pytest.approx(reference_loss(layer, [2, 4, 6], 3, renormalise), rel=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_output_with_every_expert_reproduces_a_real_moe_layer(norm_topk_prob):
    """A transformers Qwen3-MoE block, recomposed from per-expert outputs and its router logits."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=16, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob
    )
    block = Qwen3MoeSparseMoeBlock(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        expected = block(x)[0]
        hidden = x[0]
        logits = hidden @ block.gate.weight.T
        outs = []
        for e in range(6):
            gate, up = (hidden @ block.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            outs.append((torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].T)
        expert_out = torch.stack(outs, dim=1)
    torch.testing.assert_close(
        moe_output(logits, expert_out, range(6), 2, norm_topk_prob), expected, atol=1e-5, rtol=1e-4
    )


# --- routing baselines ---------------------------------------------------------------


def hand_stats() -> RoutingStats:
    stats = RoutingStats.zeros([3, 5], 5, 1)
    stats.tokens = 10
    stats.counts = torch.tensor([[4, 0, 3, 3, 0], [1, 2, 3, 4, 0]])
    stats.prob_sum = torch.tensor([[3.0, 2.0, 1.0, 2.5, 1.5], [1.0, 1.0, 1.0, 1.0, 6.0]], dtype=torch.float64)
    stats.gate_sum = torch.tensor([[1.0, 0.0, 2.9, 1.2, 0.0], [0.9, 1.0, 0.5, 1.1, 0.0]], dtype=torch.float64)
    stats.transitions[0, 0, 0] = 10
    stats.validate()
    return stats


def test_frequency_by_hand():
    # Layer 3: counts 4 > 3 = 3: experts 2 and 3 tie, prob_sum 2.5 > 1 keeps 3.
    # Layer 5: counts 4 > 3. Pinning expert 4 of layer 5 keeps it instead of expert 2.
    stats = hand_stats()
    assert METHODS["frequency"].fn(stats, None, Budget(4, 2), Constraints(1)) == {3: [0, 3], 5: [2, 3]}
    pinned = Constraints(1, pinned_experts={5: [4]})
    assert METHODS["frequency"].fn(stats, None, Budget(4, 2), pinned) == {3: [0, 3], 5: [3, 4]}
    whole = Constraints(1, pinned_layers=frozenset({3}))
    assert METHODS["frequency"].fn(stats, None, Budget(6, 1), whole) == {3: [0, 1, 2, 3, 4], 5: [3]}


def test_soft_count_by_hand():
    # Layer 3: gates 2.9 > 1.2 > 1.0; layer 5: 1.1 > 1.0 > 0.9.
    assert METHODS["soft-count"].fn(hand_stats(), None, Budget(4, 2), Constraints(1)) == {3: [2, 3], 5: [1, 3]}


def norm_signals(logits: list[list[float]], norms: list[list[float]], top_k: int) -> CalibrationSignals:
    """One layer whose expert outputs have the given norms (all along one axis)."""
    logits, norms = torch.tensor(logits, dtype=torch.float32), torch.tensor(norms, dtype=torch.float32)
    outs = norms[:, :, None] * unit(0, 2)
    tokens = logits.shape[0]
    target = moe_output(logits, outs, range(logits.shape[1]), top_k, True)
    layer = LayerSignals(logits, outs, target, torch.zeros(tokens, 2), torch.zeros(tokens, dtype=torch.int64))
    return CalibrationSignals.from_layers([layer], [0], top_k=top_k, renormalise=True)


def test_ean_and_man_by_hand():
    # Top-1: tokens 0-2 go to expert 0 (norm 1), token 3 to expert 1 (norm 2.5).
    signals = norm_signals([[5, 0, 0]] * 3 + [[0, 5, 4]], [[1, 1, 1]] * 3 + [[1, 2.5, 9]], top_k=1)
    budget, constraints = Budget(1, 1), Constraints(1)
    assert METHODS["ean"].fn(None, signals, budget, constraints) == {0: [0]}  # sums: 3 > 2.5 > 0
    assert METHODS["man"].fn(None, signals, budget, constraints) == {0: [1]}  # means: 2.5 > 1 > 0


def test_reap_by_hand():
    """Top-2, renormalised gates: tokens 0-2 -> experts 0, 1 (0.881, 0.119); token 3 -> 2, 1 (0.622, 0.378).

    Norms: tokens 0-2: 1, 4, 1; token 3: 1, 1, 3.5. EAN 3, 13, 3.5 and MAN 1, 3.25, 3.5 drop
    expert 0; REAP 0.881, (3 x 0.119 x 4 + 0.378) / 4 = 0.452, 0.622 x 3.5 = 2.18 drops expert 1.
    """
    signals = norm_signals([[3, 1, 0]] * 3 + [[0, 2, 2.5]], [[1, 4, 1]] * 3 + [[1, 1, 3.5]], top_k=2)
    budget, constraints = Budget(2, 2), Constraints(2)
    assert METHODS["ean"].fn(None, signals, budget, constraints) == {0: [1, 2]}
    assert METHODS["man"].fn(None, signals, budget, constraints) == {0: [1, 2]}
    assert METHODS["reap"].fn(None, signals, budget, constraints) == {0: [0, 2]}


# --- enumeration ---------------------------------------------------------------------


@pytest.mark.parametrize("renormalise", [False, True])
def test_exhaustive_enumeration_equals_brute_force(renormalise):
    layer = random_layer(torch.Generator().manual_seed(2), tokens=16, experts=6, top_k=2, renormalise=renormalise)
    for size, pinned, groups in ((3, (), 1), (2, (), 1), (3, (4,), 1), (4, (), 2), (4, (0,), 2)):
        allowed = [
            c
            for c in itertools.combinations(range(6), size)
            if set(pinned) <= set(c) and len({sum(1 for e in c if e // (6 // groups) == g) for g in range(groups)}) == 1
        ]
        expected = min(allowed, key=lambda c: reference_loss(layer, c, 2, renormalise))
        assert best_subset(layer, size, 2, renormalise, pinned, groups) == list(expected)


@pytest.mark.parametrize("renormalise", [False, True])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_removal_scorer_matches_moe_output(renormalise, scale):
    """The incremental greedy evaluation equals recomputing the pruned layer, even for peaked routers."""
    layer = random_layer(
        torch.Generator().manual_seed(3), tokens=20, experts=7, top_k=3, renormalise=renormalise, scale=scale
    )
    scorer = RemovalScorer(layer, 3, renormalise)
    for kept in ([0, 1, 2, 3, 4, 5, 6], [0, 2, 3, 5], [1, 4, 6], [2, 5]):
        keep = torch.zeros(7, dtype=torch.bool)
        keep[kept] = True
        losses = scorer.losses(keep)
        for e in range(7):
            if e in kept:
                rest = [x for x in kept if x != e]
                assert losses[e].item() == pytest.approx(
                    reconstruction_error(layer, rest, 3, renormalise).sum().item(), rel=1e-6, abs=1e-6
                )
            else:
                assert losses[e] == math.inf


@pytest.mark.parametrize("renormalise", [False, True])
def test_greedy_removal_follows_the_reference_greedy(renormalise):
    layer = random_layer(torch.Generator().manual_seed(4), tokens=16, experts=8, top_k=2, renormalise=renormalise)
    kept = list(range(8))
    while len(kept) > 3:
        kept.remove(
            min(
                (e for e in kept if e != 6),
                key=lambda e: reference_loss(layer, [x for x in kept if x != e], 2, renormalise),
            )
        )
    assert greedy_removal(layer, 3, 2, renormalise, pinned=[6]) == kept
    assert best_subset(layer, 3, 2, renormalise, [6], max_subsets=0) == kept


# --- pathfinder ----------------------------------------------------------------------


def test_k_best_paths_by_hand():
    scores = torch.tensor([[[0.0, -1.0, -5.0], [-2.0, 0.0, -3.0]]], dtype=torch.float64)
    # Paths (0,1)=0, (1,1)=-1, (0,0)=-2: layer 0 used by experts 0,1,0; layer 1 by 1,1,0.
    assert k_best_path_counts(scores, 3).tolist() == [[2, 1, 0], [1, 2, 0]]
    # Forbid (layer 1, expert 1): (0,0)=-2, then (1,0)=-3 ties (0,2)=-3: the earlier parent (0) wins.
    scores[0, 1, 1] = -math.inf
    assert k_best_path_counts(scores, 2).tolist() == [[2, 0, 0], [1, 0, 1]]
    # Two sequences add up; asking for more paths than exist counts the 6 finite ones.
    both = torch.cat([scores, scores])
    assert k_best_path_counts(both, 1).tolist() == [[2, 0, 0], [2, 0, 0]]
    assert k_best_path_counts(scores, 9).sum().item() == 2 * 6


def test_tukey_fences():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, -50.0], [1.0, 1.0, 1.0, 1.0, 1.0, 9.0]], dtype=torch.float64)
    below, above = tukey_outliers(values)
    # Row 0: quartiles 1.25 and 3.75 (linear), IQR 2.5, fences -6.25 and 11.25.
    assert below[0].tolist() == [False] * 5 + [True] and above[0].tolist() == [False] * 4 + [True, False]
    # Row 1 has no spread: no outliers at all.
    assert not below[1].any() and not above[1].any()


def path_layer(best: int, second: int, tokens: int = 4, experts: int = 4) -> LayerSignals:
    """Router prefers ``best`` (logit 3), then ``second`` (1); the layer output is exactly ``f_best``.

    Every expert output has norm 1 (no norm outliers); every expert but ``best`` misses the
    output by the same amount (no loss outliers).
    """
    logits = torch.zeros(tokens, experts)
    logits[:, best], logits[:, second] = 3.0, 1.0
    outs = torch.eye(experts).expand(tokens, experts, experts).clone()
    return LayerSignals(
        logits, outs, outs[:, best].clone(), torch.zeros(tokens, experts), torch.zeros(tokens, dtype=torch.int64)
    )


def test_pathfinder_keeps_the_obvious_path_with_a_floor_and_a_global_budget():
    signals = CalibrationSignals.from_layers([path_layer(0, 2), path_layer(3, 1)], [10, 11], top_k=1, renormalise=False)
    # The best path is (0, 3); the spare expert goes to the best other node: 2 or 1, whose
    # scores are equal in both layers, so the lower layer wins.
    assert pathfinder(None, signals, Budget(3, None), Constraints(1), paths=1) == {10: [0, 2], 11: [3]}
    assert pathfinder(None, signals, Budget(2, None), Constraints(1), paths=1) == {10: [0], 11: [3]}
    # A budget of 3 with layer 11 pinned whole: the floor of layer 10 still holds (1 expert).
    whole = Constraints(1, pinned_layers=frozenset({11}))
    assert pathfinder(None, signals, Budget(5, None), whole, paths=1) == {10: [0], 11: [0, 1, 2, 3]}
    with pytest.raises(BudgetError, match="minimum"):
        pathfinder(None, signals, Budget(1, None), Constraints(1))


def test_pathfinder_non_uniform_allocation_follows_path_frequency():
    """Two sequences take different experts in layer 0 and the same in layer 1: layer 0 gets more."""
    first = path_layer(0, 1, tokens=8)
    logits = first.router_logits.clone()
    logits[4:] = 0.0
    logits[4:, 2] = 3.0  # sequence 1 routes to expert 2 in layer 0
    outs = first.expert_out
    target = first.layer_out.clone()
    target[4:] = outs[4:, 2]
    seq = torch.tensor([0] * 4 + [1] * 4)
    layer0 = LayerSignals(logits, outs, target, first.hidden, seq)
    second = path_layer(3, 1, tokens=8)
    layer1 = LayerSignals(second.router_logits, second.expert_out, second.layer_out, second.hidden, seq)
    signals = CalibrationSignals.from_layers([layer0, layer1], [0, 1], top_k=1, renormalise=False)
    assert pathfinder(None, signals, Budget(3, None), Constraints(1), paths=1) == {0: [0, 2], 1: [3]}


def test_pathfinder_floor_keeps_top_k_where_paths_concentrate():
    """Every sequence's path uses expert 0 in layer 0 but a different expert in layer 1.

    By path frequency alone a budget of 4 would keep (0, 0) and all three layer-1 experts,
    leaving layer 0 below top_k = 2; the floor gives layer 0 its best other expert (1, the
    router's second choice) and layer 1 its two best (ties on frequency and score: lower id).
    """
    seq = torch.arange(6) // 2
    layer0 = path_layer(0, 1, tokens=6)
    layer0 = LayerSignals(layer0.router_logits, layer0.expert_out, layer0.layer_out, layer0.hidden, seq)
    logits = torch.zeros(6, 4)
    logits[torch.arange(6), seq + 1] = 3.0
    outs = torch.eye(4).expand(6, 4, 4).clone()
    layer1 = LayerSignals(logits, outs, outs[torch.arange(6), seq + 1].clone(), torch.zeros(6, 4), seq)
    signals = CalibrationSignals.from_layers([layer0, layer1], [0, 1], top_k=2, renormalise=False)
    assert pathfinder(None, signals, Budget(4, None), Constraints(2), paths=1) == {0: [0, 1], 1: [1, 2]}
    assert pathfinder(None, signals, Budget(5, None), Constraints(2), paths=1) == {0: [0, 1], 1: [1, 2, 3]}


def test_pathfinder_outliers_keep_wins(caplog):
    """Expert 5's huge output is both a high-norm (keep) and a high-loss (drop) outlier: kept."""
    experts = 8
    scale = torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 50.0, 1.5, 1.6])
    logits = torch.zeros(4, experts)
    logits[:, 0] = 2.0
    outs = (torch.eye(experts) * scale[:, None]).expand(4, experts, experts).clone()
    layer = LayerSignals(logits, outs, outs[:, 0].clone(), torch.zeros(4, experts), torch.zeros(4, dtype=torch.int64))
    signals = CalibrationSignals.from_layers([layer], [0], top_k=1, renormalise=False)
    # Expert 0 reproduces the output (a low-loss outlier, kept) and expert 5 is kept by norm.
    assert pathfinder(None, signals, Budget(2, None), Constraints(1)) == {0: [0, 5]}
    with caplog.at_level(logging.WARNING):
        assert pathfinder(None, signals, Budget(1, None), Constraints(1)) == {0: [0]}
    assert "leaves out 1 of 2 forced-keep" in caplog.text


# --- mosaic --------------------------------------------------------------------------


def mosaic_signals() -> CalibrationSignals:
    """Three token domains and three pairs of experts, each pair good on one domain.

    Profiles (squared error per domain A, B, C): pair {0, 1} [0.1, 1, 2], pair {2, 3}
    [1, 0.1, 2], pair {4, 5} [2, 1, 0.1] (expert 1, 3, 5: x1.1). Specialists (routing
    mass concentrated on their domain): 0, 3 (the most), 4.
    """
    generator = torch.Generator().manual_seed(5)
    tokens, hidden = 30, 4
    domain = torch.arange(tokens) // 10
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    x = centres[domain] + 0.1 * torch.randn(tokens, hidden, generator=generator)
    target = torch.randn(tokens, hidden, generator=generator)
    profile = torch.tensor([[0.1, 1.0, 2.0], [1.0, 0.1, 2.0], [2.0, 1.0, 0.1]])
    sq_error = torch.stack([profile[e // 2] * (1.1 if e % 2 else 1.0) for e in range(6)])  # [E, domains]
    outs = target[:, None, :] + sq_error[:, domain].T.sqrt()[:, :, None] * unit(3, hidden)
    logits = torch.zeros(tokens, 6)
    for expert, home, strength in ((0, 0, 4.0), (3, 1, 5.0), (4, 2, 4.0)):
        logits[:, expert] = torch.where(domain == home, strength, -strength)
    layer = LayerSignals(logits, outs, target, x, torch.zeros(tokens, dtype=torch.int64))
    return CalibrationSignals.from_layers([layer], [0], top_k=2, renormalise=True)


def test_spearman_distance_by_hand():
    profiles = np.array([[0.1, 1.0, 2.0], [1.0, 0.1, 2.0], [2.0, 1.0, 0.1], [5.0, 5.0, 5.0]])
    # rho(A, B) = 0.5, rho(A, C) = -1, rho(B, C) = -0.5; a constant profile correlates 0.
    expected = np.array([[0, 0.25, 1, 0.5], [0.25, 0, 0.75, 0.5], [1, 0.75, 0, 0.5], [0.5, 0.5, 0.5, 0]])
    np.testing.assert_allclose(spearman_distance(profiles), expected)


def test_mosaic_keeps_one_specialist_per_functional_cluster():
    signals = mosaic_signals()
    assert mosaic(None, signals, Budget(3, 3), Constraints(2), general=0) == {0: [0, 3, 4]}


def test_mosaic_with_fewer_than_three_clusters():
    """K = 2 < 3: profiles still use 3 token domains; Ward joins pairs {0,1} and {2,3} (closest)."""
    assert mosaic(None, mosaic_signals(), Budget(2, 2), Constraints(2), general=0) == {0: [3, 4]}


# --- every method: constraints, determinism, inputs ---------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_respects_constraints_and_is_deterministic(name):
    spec = METHODS[name]
    stats, signals = random_model(seed=6, groups=2)
    constraints = Constraints(2, num_groups=2, pinned_experts={1: [5]}, pinned_layers=frozenset({4}))
    budget = resolve_budget("50%", [[10] * 8] * 3, constraints, [1, 2, 4], uniform=spec.uniform)
    kept = spec.fn(stats, signals, budget, constraints)
    shape = MoEShape(FAMILIES["qwen3_moe"], (1, 2, 4), 8, 2, True, 2, topk_groups=2)
    validate_kept(shape, kept, constraints.pinned_experts)  # top_k floor, groups balanced, pins kept
    assert kept[4] == list(range(8))
    if spec.uniform:
        assert len(kept[1]) == len(kept[2]) == budget.per_layer
    assert sum(map(len, kept.values())) <= budget.total
    assert spec.fn(stats, signals, budget, constraints) == kept


@pytest.mark.parametrize("name", list(METHODS))
def test_missing_inputs_name_the_command_that_produces_them(name):
    spec = METHODS[name]
    command = "vllm-moe-prune calibrate" if CALIBRATION in spec.needs else "vllm-moe-prune trace"
    with pytest.raises(UserError, match=command):
        spec.fn(None, None, Budget(8, 4), Constraints(2))


def test_bad_inputs_are_refused():
    stats, signals = random_model(seed=7)
    stats.prob_sum[0, 0] = float("nan")
    with pytest.raises(StatsError, match="NaN"):
        METHODS["frequency"].fn(stats, None, Budget(12, 4), Constraints(2))
    layer = signals.layer(0)
    broken = LayerSignals(
        layer.router_logits,
        layer.expert_out.clone().fill_(float("nan")),
        layer.layer_out,
        layer.hidden,
        layer.seq_index,
    )
    bad = CalibrationSignals.from_layers([broken], [1], 2, True)
    with pytest.raises(SignalsError, match="expert_out contains NaN"):
        METHODS["reap"].fn(None, bad, Budget(4, 4), Constraints(2))
    with pytest.raises(UserError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ConstraintError, match="do not match the calibration signals"):
        METHODS["reap"].fn(None, signals, Budget(4, 4), Constraints(1))
    with pytest.raises(UserError, match="paths >= 1"):
        pathfinder(None, signals, Budget(12, None), Constraints(2), paths=0)


def test_budgets_that_violate_constraints_are_refused():
    stats, _ = random_model(seed=8)
    with pytest.raises(BudgetError, match="no uniform"):
        METHODS["frequency"].fn(stats, None, Budget(12, None), Constraints(2))
    with pytest.raises(BudgetError, match="violates"):
        METHODS["frequency"].fn(stats, None, Budget(3, 1), Constraints(2))
    keys = [np.zeros((3, 8))]
    with pytest.raises(BudgetError, match="minimum"):
        keep_global(keys, Budget(5, None), Constraints(2), [1, 2, 4], 8)


def test_group_rows_balance_groups():
    # Order 7, 6, 0, 5, ...: group 0 = {0..3}, group 1 = {4..7}; row j = j-th best of each group.
    rows = group_rows(np.array([7, 6, 0, 5, 1, 2, 3, 4]), 8, 2)
    assert rows.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_registry_declares_inputs():
    assert {spec.name for spec in METHODS.values() if ROUTING in spec.needs} == {"frequency", "soft-count"}
    assert not METHODS["pathfinder"].uniform and METHODS["mosaic"].uniform
