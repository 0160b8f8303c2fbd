"""The standalone exporter: contents, streaming reads, sharding, non-uniform plans, refusals.

Numerical equivalence of exported uniform variants is in tests/test_reference.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors import safe_open

import vllm_moe_prune.remap as remap
from reference import load_float32, logprobs, tiny_checkpoint
from vllm_moe_prune.budget import budget_for_checkpoint
from vllm_moe_prune.checkpoint import Checkpoint, CheckpointError
from vllm_moe_prune.export import PLAN_FILE, ExportError, export_pruned
from vllm_moe_prune.plan import Plan, PlanError


def read(model_dir, name):
    ckpt = Checkpoint.open(model_dir)
    with safe_open(str(ckpt.path / ckpt.tensors[name].file), framework="pt") as f:
        return f.get_tensor(name)


def test_uniform_export_contents_and_streaming(tiny_root, tmp_path, monkeypatch):
    model_dir = tiny_checkpoint("qwen2_moe", tiny_root)
    ckpt = Checkpoint.open(model_dir)
    family = ckpt.shape.family
    kept = {layer: [1, 2, 5, 7] for layer in ckpt.shape.moe_layers}
    plan = Plan.for_checkpoint(ckpt, kept, method="test")

    requested: list[str] = []
    real_safe_open = remap.safe_open

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            requested.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(remap, "safe_open", RecordingSafeOpen)  # where every kept tensor is read
    out = export_pruned(model_dir, plan, tmp_path / "variant")

    pruned = {n for layer in kept for e in (0, 3, 4, 6) for n in family.expert_tensor_names(layer, e)}
    assert requested and not pruned & set(requested), "pruned experts must never be read"
    assert len(requested) == len(set(requested))

    variant = Checkpoint.open(out)
    assert variant.shape.num_experts == 4
    assert variant.config["moe_prune"]["plan_id"] == plan.plan_id
    assert variant.config["moe_prune"]["uniform"] is True
    assert Plan.load(out / PLAN_FILE).kept == plan.kept
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"
    assert not [p for p in tmp_path.iterdir() if p.name != "variant"]

    layer = ckpt.shape.moe_layers[-1]
    for new, old in enumerate(kept[layer]):
        for a, b in zip(family.expert_tensor_names(layer, new), family.expert_tensor_names(layer, old)):
            assert torch.equal(read(out, a), read(model_dir, b))
    assert torch.equal(read(out, family.router_name(layer)), read(model_dir, family.router_name(layer))[kept[layer]])
    shared = f"model.layers.{layer}.mlp.shared_expert_gate.weight"
    assert torch.equal(read(out, shared), read(model_dir, shared))
    renamed = {
        old: new
        for layer, ids in kept.items()
        for new_id, old_id in enumerate(ids)
        for new, old in zip(family.expert_tensor_names(layer, new_id), family.expert_tensor_names(layer, old_id))
    }
    assert set(variant.tensors) == {renamed.get(n, n) for n in ckpt.tensors if n not in pruned}


def test_sharded_export_loads_like_a_single_file(tiny_root, tmp_path):
    model_dir = tiny_checkpoint("mixtral", tiny_root)
    ckpt = Checkpoint.open(model_dir)
    plan = Plan.for_checkpoint(ckpt, {layer: [0, 2, 4, 6, 7] for layer in ckpt.shape.moe_layers}, method="test")
    single = export_pruned(model_dir, plan, tmp_path / "single")
    sharded = export_pruned(model_dir, plan, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(p.name for p in sharded.glob("*.safetensors")) == files
    assert set(index["weight_map"]) == set(Checkpoint.open(single).tensors)
    prompt = [[0, 5, 300, 77, 12, 250, 8]]
    torch.testing.assert_close(logprobs(load_float32(sharded), prompt), logprobs(load_float32(single), prompt))


def test_non_uniform_export_records_counts_per_layer(tiny_root, tmp_path):
    model_dir = tiny_checkpoint("deepseek_v3", tiny_root)
    ckpt = Checkpoint.open(model_dir)
    first, second = ckpt.shape.moe_layers
    # Two groups of four: equal counts per group, different counts per layer.
    kept = {first: [0, 1, 4, 5], second: [0, 2, 3, 4, 6, 7]}
    plan = Plan.for_checkpoint(ckpt, kept, method="test")
    out = export_pruned(model_dir, plan, tmp_path / "variant")
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 6
    assert config["moe_prune"]["uniform"] is False
    assert config["moe_prune"]["experts_per_layer"] == {str(first): 4, str(second): 6}
    # Only the plugin's class can build it; vLLM picks the class by architecture.
    assert config["architectures"] == [ckpt.shape.family.pruned_architecture]
    variant = Checkpoint.open(out)
    assert variant.experts_per_layer == {first: 4, second: 6}
    assert variant.expert_bytes == [[ckpt.expert_bytes[0][0]] * 4, [ckpt.expert_bytes[1][0]] * 6]
    family = ckpt.shape.family
    for layer, ids in kept.items():
        present = {e for e in range(8) if family.expert_tensor_names(layer, e)[0] in variant.tensors}
        assert present == set(range(len(ids)))
        bias = family.router_extra_names(layer)[0]
        assert torch.equal(read(out, bias), read(model_dir, bias)[ids])
    dense = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(read(out, dense), read(model_dir, dense))


def test_refusals_leave_nothing_behind(tiny_root, tmp_path):
    model_dir = tiny_checkpoint("olmoe", tiny_root)
    other_dir = tiny_checkpoint("qwen3_moe", tiny_root)
    ckpt = Checkpoint.open(model_dir)
    plan = Plan.for_checkpoint(ckpt, {layer: [0, 1, 2] for layer in ckpt.shape.moe_layers}, method="test")
    with pytest.raises(PlanError, match="was made for model"):
        export_pruned(other_dir, plan, tmp_path / "wrong")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_pruned(model_dir, plan, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_every_tensor_of_an_expert_moves_with_it(tiny_root, tmp_path):
    """FP8 checkpoints carry a scale beside each expert weight: it must follow its expert."""
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint("deepseek_v3", tiny_root)
    model_dir = tmp_path / "with_scales"
    shutil.copytree(source, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    ckpt = Checkpoint.open(source)
    family = ckpt.shape.family
    for layer in ckpt.shape.moe_layers:
        for expert in range(8):
            tensors[family.expert_prefix(layer, expert) + "down_proj.weight_scale_inv"] = torch.full((1,), expert * 1.0)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    ckpt = Checkpoint.open(model_dir)
    kept = {layer: [1, 2, 5, 6] for layer in ckpt.shape.moe_layers}
    out = export_pruned(model_dir, Plan.for_checkpoint(ckpt, kept, method="test"), tmp_path / "variant")
    variant = Checkpoint.open(out)
    for layer in ckpt.shape.moe_layers:
        scales = [n for n in variant.tensors if n.startswith(f"model.layers.{layer}.") and "scale" in n]
        assert len(scales) == 4
        for new, old in enumerate(kept[layer]):
            assert read(out, family.expert_prefix(layer, new) + "down_proj.weight_scale_inv").item() == old


def test_export_is_readable_like_any_new_file(tiny_root, tmp_path):
    model_dir = tiny_checkpoint("mixtral", tiny_root)
    ckpt = Checkpoint.open(model_dir)
    plan = Plan.for_checkpoint(ckpt, {layer: [0, 1, 2, 3] for layer in ckpt.shape.moe_layers}, method="test")
    out = export_pruned(model_dir, plan, tmp_path / "variant")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_exports_are_refused_as_planning_input(tiny_root, tmp_path):
    """Plans and budgets index the original experts: an export is not their input."""
    model_dir = tiny_checkpoint("qwen3_moe", tiny_root)
    ckpt = Checkpoint.open(model_dir)
    plan = Plan.for_checkpoint(ckpt, {layer: [0, 1, 2, 3] for layer in ckpt.shape.moe_layers}, method="test")
    variant = Checkpoint.open(export_pruned(model_dir, plan, tmp_path / "variant"))
    assert variant.experts_per_layer == {layer: 4 for layer in ckpt.shape.moe_layers}
    with pytest.raises(CheckpointError, match=f"is a pruned export \\(plan {plan.plan_id}\\); set budgets on the original"):
        budget_for_checkpoint("50%", variant)
    with pytest.raises(CheckpointError, match="apply plans on the original"):
        plan.validate_for(variant)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"experts_per_layer": [4, 4]}, "must map MoE layers to counts"),
        ({"experts_per_layer": {"0": "four", "1": 4}}, "is malformed"),
        ({"experts_per_layer": {"0": 4}}, r"names layers \[0\], but the MoE layers are \[0, 1, 2\]"),
        ({"experts_per_layer": {"0": 4, "1": 1, "2": 4}}, "gives MoE layer 1 1 experts; expected 2 \\(top_k\\) to 8"),
    ],
)
def test_malformed_export_record_is_refused(tiny_root, tmp_path, record, problem):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen3_moe", tiny_root), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["moe_prune"] = record
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=problem):
        Checkpoint.open(model_dir).experts_per_layer
