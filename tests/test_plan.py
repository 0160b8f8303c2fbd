"""Plan files: validation on load and against a checkpoint, each refusal naming the problem."""

from __future__ import annotations

import pytest
import yaml

from reference import tiny_checkpoint
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.plan import Plan, PlanError
from vllm_moe_prune.serving import engine_args


@pytest.fixture(scope="module")
def ckpt(tiny_root):
    return Checkpoint.open(tiny_checkpoint("qwen3_moe", tiny_root))


def _kept(ckpt, n=4):
    return {layer: list(range(n)) for layer in ckpt.shape.moe_layers}


def test_round_trip_and_predicted_bytes(ckpt, tmp_path):
    plan = Plan.for_checkpoint(ckpt, _kept(ckpt), "frequency")
    plan.save(tmp_path / "p.yaml")
    loaded = Plan.load(tmp_path / "p.yaml")
    assert loaded.kept == plan.kept and loaded.plan_id == plan.plan_id
    per_expert = ckpt.expert_bytes[0][0]
    kept = 4 * len(ckpt.shape.moe_layers)
    assert plan.predicted["routed_expert_bytes_kept"] == kept * per_expert
    assert plan.predicted["weight_bytes"] == ckpt.total_bytes - (ckpt.shape.num_experts * len(ckpt.shape.moe_layers) - kept) * per_expert


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda k, l: k.__setitem__(l, [0, 1, 99]), "out of range"),
        (lambda k, l: k.__setitem__(l, [0, 1, 1]), "more than once"),
        (lambda k, l: k.__setitem__(l, [3]), "fewer than top_k"),
        (lambda k, l: k.pop(l), "missing layers"),
        (lambda k, l: k.__setitem__(l, ["a", 1]), "integers"),
    ],
)
def test_invalid_kept_sets_are_refused_naming_the_layer(ckpt, tmp_path, change, message):
    plan = Plan.for_checkpoint(ckpt, _kept(ckpt), "frequency")
    data = plan.to_dict()
    kept = {entry["layer"]: entry["kept"] for entry in data["layers"]}
    layer = ckpt.shape.moe_layers[-1]
    change(kept, layer)
    data["layers"] = [{"layer": k, "kept": v} for k, v in kept.items()]
    data.pop("plan_id")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=message) as err:
        Plan.load(tmp_path / "p.yaml").validate_for(ckpt)
    if message != "missing layers":
        assert f"layer {layer}" in str(err.value)
    # engine_args (what serve-args and the tests use) refuses before any engine starts.
    with pytest.raises(PlanError, match=message):
        engine_args(ckpt.path, tmp_path / "p.yaml")


def test_other_model_is_refused(ckpt, tiny_root, tmp_path):
    other = Checkpoint.open(tiny_checkpoint("olmoe", tiny_root))
    Plan.for_checkpoint(other, _kept(other), "frequency").save(tmp_path / "p.yaml")
    with pytest.raises(PlanError, match="was made for model"):
        engine_args(ckpt.path, tmp_path / "p.yaml")


@pytest.mark.parametrize("text", ["", "[1, 2]", "format: other\n", "{{{", "format: vllm-moe-prune/plan\nversion: 9\n"])
def test_malformed_files_are_refused(tmp_path, text):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PlanError):
        Plan.load(tmp_path / "p.yaml")


def test_missing_file_and_edited_plan(ckpt, tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.yaml")
    plan = Plan.for_checkpoint(ckpt, _kept(ckpt), "frequency")
    data = plan.to_dict()
    data["layers"][0]["kept"] = [0, 1, 2, 5]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match="was it edited"):
        Plan.load(tmp_path / "p.yaml")


def test_save_is_atomic(ckpt, tmp_path, monkeypatch):
    """A failing write leaves the previous plan intact and no temporary behind."""
    plan = Plan.for_checkpoint(ckpt, _kept(ckpt), "frequency")
    plan.save(tmp_path / "p.yaml")
    before = (tmp_path / "p.yaml").read_text()

    real_write_text = type(tmp_path).write_text

    def half_then_fail(path, text, *args, **kwargs):
        real_write_text(path, text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(type(tmp_path), "write_text", half_then_fail)
    with pytest.raises(OSError):
        Plan.for_checkpoint(ckpt, _kept(ckpt, 5), "frequency").save(tmp_path / "p.yaml")
    assert (tmp_path / "p.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


@pytest.mark.parametrize(
    ("family", "kept", "message"),
    [
        ("deepseek_v3", [0, 4], r"keeps 1 experts per group; .* ranked by their two best experts, .* at least 2"),
        ("deepseek_v3", [0, 1, 2, 4], r"same number of kept experts in every group, got \[3, 1\]"),
        ("deepseek_v2", [0, 2, 4], r"same number of kept experts in every group, got \[1, 1, 1, 0\]"),
    ],
)
def test_grouped_routing_floors(tiny_root, family, kept, message):
    """DeepSeek routes inside groups: every group keeps the same number, and enough of them."""
    ckpt = Checkpoint.open(tiny_checkpoint(family, tiny_root))
    with pytest.raises(PlanError, match=message):
        Plan.for_checkpoint(ckpt, {layer: kept for layer in ckpt.shape.moe_layers}, "test")


def test_grouped_routing_floor_reaches_the_planner(tiny_root):
    from vllm_moe_prune.budget import Constraints

    v3 = Checkpoint.open(tiny_checkpoint("deepseek_v3", tiny_root)).shape  # 2 groups of 4, 1 picked, top-2
    v2 = Checkpoint.open(tiny_checkpoint("deepseek_v2", tiny_root)).shape  # 4 groups of 2, 2 picked, top-2
    assert (v3.min_kept_per_group, v2.min_kept_per_group) == (2, 1)
    assert Constraints.for_shape(v3).min_experts(v3.moe_layers[0], v3.num_experts) == 4
    assert Constraints.for_shape(v2).min_experts(v2.moe_layers[0], v2.num_experts) == 4
    # V2 with 1 per group (4 kept) is servable: top-2 picked inside 2 groups of 1.
    Plan.for_checkpoint(Checkpoint.open(tiny_checkpoint("deepseek_v2", tiny_root)),
                        {layer: [0, 2, 4, 6] for layer in v2.moe_layers}, "test")
