"""``vllm-moe-prune inspect``: the printed numbers against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.cli import main
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.traces import ShardMeta, from_routed_experts, write_shard

torch.set_num_threads(1)

EXPERT_BYTES = 3 * 64 * 64 * 4  # gate, up, down: 64 x 64 float32 each
# 4 tokens, top-2, routed in MoE layer 0 and 1; slot 0 has probability .5, slot 1 .25.
ROUTED = torch.tensor(
    [
        [[0, 1], [1, 3]],
        [[0, 2], [1, 5]],
        [[1, 3], [6, 7]],
        [[4, 0], [0, 1]],
    ]
)
PROBS = torch.tensor([0.5, 0.25]).expand(4, 2, 2)
KEPT = {0: [0, 1, 2, 3], 1: [1, 2, 3, 4, 5, 7]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, int]:
    """A tiny Qwen3-MoE checkpoint and its weight bytes counted from the model itself."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return path, sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.fixture(scope="module")
def plan_file(model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    Plan.for_checkpoint(Checkpoint.open(model_dir[0]), KEPT, "manual").save(path)
    return path


@pytest.fixture
def trace_dir(model_dir, tmp_path) -> Path:
    """Tokens 0-1 labelled python, 2-3 prose: two shards that must be merged."""
    fingerprint = Checkpoint.open(model_dir[0]).fingerprint
    for label, tokens in (("python", slice(0, 2)), ("prose", slice(2, 4))):
        stats = from_routed_experts(ROUTED[tokens], 8, (0, 1), PROBS[tokens])
        write_shard(tmp_path / "traces", stats, ShardMeta(fingerprint, 1e9, 1e9 + 60, label=label))
    return tmp_path / "traces"


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table keyed by their first cell (layer index or ``all``)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_plan_with_traces_and_model(capsys, model_dir, plan_file, trace_dir):
    path, full_bytes = model_dir
    code, out, _ = inspect(capsys, plan_file, "--traces", trace_dir, "--model", path)
    assert code == 0
    rows = table(out)
    # layer 0 keeps 0-3: counts 0:3 1:2 2:1 3:1 4:1 -> 7/8 routed; prob lost: expert 4 slot 0 (.5) of 3 -> 2.5/3
    assert rows["0"] == ["4/8", f"{4 * EXPERT_BYTES:,}", "83.33%", "87.50%"]
    # layer 1 drops 0 and 6: counts 1:3 3:1 5:1 7:1 -> 6/8; prob lost: 6 and 0 in slot 0 (.5 + .5) -> 2/3
    assert rows["1"] == ["6/8", f"{6 * EXPERT_BYTES:,}", "66.67%", "75.00%"]
    assert rows["all"] == ["10/16", f"{10 * EXPERT_BYTES:,}", "75.00%", "81.25%"]  # 4.5/6 and 13/16
    pruned = 6 * EXPERT_BYTES
    kept_share = (full_bytes - pruned) / full_bytes
    assert f"weights: {full_bytes - pruned:,} of {full_bytes:,} bytes ({kept_share:.2%})" in out
    assert f"{pruned:,} pruned" in out
    assert "2 shards, 4 tokens" in out and "labels: prose=2 python=2" in out and "from the checkpoint" in out


def test_plan_alone_uses_predicted_bytes(capsys, plan_file):
    code, out, _ = inspect(capsys, plan_file)
    assert code == 0 and "from the plan's prediction" in out
    assert table(out) == {
        "0": ["4/8", f"{4 * EXPERT_BYTES:,}"],
        "1": ["6/8", f"{6 * EXPERT_BYTES:,}"],
        "all": ["10/16", f"{10 * EXPERT_BYTES:,}"],
    }


def test_label_selects_traffic(capsys, plan_file, trace_dir):
    code, out, _ = inspect(capsys, plan_file, "--traces", trace_dir, "--label", "python")
    assert code == 0 and "1 shard, 2 tokens" in out
    # tokens 0-1 only: layer 0 routes to 0, 1, 2 (all kept); layer 1 to 1, 3, 1, 5 (all kept)
    assert table(out)["all"][2:] == ["100.00%", "100.00%"]


def test_traces_alone(capsys, trace_dir):
    code, out, _ = inspect(capsys, "--traces", trace_dir, "--top", "2")
    assert code == 0

    def entropy(counts: list[int]) -> float:
        return -sum(c / 8 * math.log2(c / 8) for c in counts if c)

    h0, h1 = entropy([3, 2, 1, 1, 1]), entropy([1, 3, 1, 1, 1, 1])
    rows = table(out)
    assert rows["0"] == ["8", f"{h0:.2f}/3.00", f"{2**h0:.1f}", "3", "0:37.5%", "1:25.0%"]
    assert rows["1"] == ["8", f"{h1:.2f}/3.00", f"{2**h1:.1f}", "2", "1:37.5%", "0:12.5%"]  # ties: lower id first


def test_traces_without_probabilities_show_no_prob_coverage(capsys, model_dir, plan_file, tmp_path):
    stats = from_routed_experts(ROUTED, 8, (0, 1))
    write_shard(tmp_path, stats, ShardMeta(Checkpoint.open(model_dir[0]).fingerprint, 1e9, 1e9))
    code, out, _ = inspect(capsys, plan_file, "--traces", tmp_path)
    assert code == 0 and table(out)["0"][2:] == ["-", "87.50%"]


def test_traces_of_another_model_are_refused(capsys, plan_file, tmp_path):
    other = write_shard(tmp_path, from_routed_experts(ROUTED, 8, (0, 1)), ShardMeta("sha256:other", 1e9, 1e9))
    code, out, err = inspect(capsys, plan_file, "--traces", tmp_path)
    assert code == 2 and not out and str(other) in err and "sha256:other" in err


def test_nothing_to_inspect(capsys):
    code, _, err = inspect(capsys)
    assert code == 2 and "give a PLAN file, --traces PATH, or both" in err
