"""The streamed calibration pass, its storage and the ``calibrate`` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vllm_moe_prune.calibration as calibration
from reference import load_float32, tiny_checkpoint
from vllm_moe_prune.calibration import (
    CalibrationError,
    StreamedModel,
    load_calibration,
    read_manifest,
    run_calibration,
    select_sequences,
)
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.prompts import PromptError, read_prompts
from vllm_moe_prune.cli import main
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.signals import moe_output
from vllm_moe_prune.testbed.families import FAMILY_NAMES

PROMPTS = [
    {"prompt": "def add(x, y):\n    return x + y\n\nprint(add(2, 3))"},
    {"text": "The quick brown fox jumps over the lazy dog. 12 + 30 = 42, and 7 * 6 = 42 too."},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]},
    {"prompt": "struct point { int x; int y; };  /* a C struct */"},
]
SEQUENCES = [[0, 5, 300, 77, 12, 250, 8, 411, 95, 3, 17], [0, 44, 45, 46, 128, 129, 130]]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def full_model_moe_records(model, moe_layers, ids):
    """Router outputs, MoE inputs and routed outputs of the full transformers model, by hooks."""
    records = {}

    def keep(layer, what):
        def hook(module, args, output):
            records[(layer, what)] = (args, output)

        return hook

    handles = []
    for layer in moe_layers:
        mlp = model.model.layers[layer].mlp
        handles.append(mlp.gate.register_forward_hook(keep(layer, "gate")))
        handles.append(mlp.experts.register_forward_hook(keep(layer, "experts")))
    with torch.no_grad():
        hidden_states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    return records, hidden_states


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streamed_layers_equal_the_full_forward(tiny_root, family):
    model_dir = tiny_checkpoint(family, tiny_root)
    model = load_float32(model_dir)
    streamed = StreamedModel(Checkpoint.open(model_dir))
    last = len(streamed.layers) - 1
    full = [model(torch.tensor([ids]), output_hidden_states=True).hidden_states for ids in SEQUENCES]
    seen = []
    for index, outputs in streamed.hidden_states(SEQUENCES, last):
        seen.append(index)
        for out, states in zip(outputs, full):
            # transformers reports the last layer's output after the final norm.
            expected = states[index + 1]
            got = model.model.norm(out) if index == last else out
            assert torch.equal(got, expected), f"decoder layer {index}"
    assert seen == list(range(last + 1))
    assert all(p.is_meta for p in streamed.layers.parameters()), "every layer is freed after use"


def test_streaming_reads_one_layer_at_a_time(tiny_root, monkeypatch):
    model_dir = tiny_checkpoint("qwen3_moe", tiny_root)
    reads: list[set[str]] = []
    real_read = StreamedModel._read

    def recording_read(self, wanted):
        out = real_read(self, wanted)
        reads.append({name.split(".")[2] if name.startswith("model.layers.") else "outside" for name in out})
        return out

    monkeypatch.setattr(StreamedModel, "_read", recording_read)
    streamed = StreamedModel(Checkpoint.open(model_dir))
    list(streamed.hidden_states(SEQUENCES, 1))
    assert reads == [{"outside"}, {"0"}, {"1"}]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_signals_match_the_full_model(tiny_root, prompts_file, tmp_path, family):
    model_dir = tiny_checkpoint(family, tiny_root)
    ckpt = Checkpoint.open(model_dir)
    out = run_calibration(model_dir, prompts_file, tmp_path / "calib", max_tokens=60, max_seq_len=25, progress=False)
    signals = load_calibration(out, fingerprint=ckpt.fingerprint)
    token_ids = load_tokens(out)
    model = load_float32(model_dir)
    full = [full_model_moe_records(model, ckpt.shape.moe_layers, ids) for ids in token_ids]
    assert signals.moe_layers == ckpt.shape.moe_layers and signals.num_sequences == len(token_ids)

    for layer, got in signals.layers():
        logits = torch.cat([records[(layer, "gate")][1][0] for records, _ in full])
        weights = torch.cat([records[(layer, "gate")][1][1] for records, _ in full])
        chosen = torch.cat([records[(layer, "gate")][1][2] for records, _ in full])
        hidden = torch.cat([records[(layer, "experts")][0][0] for records, _ in full])
        routed = torch.cat([records[(layer, "experts")][1] for records, _ in full])
        torch.testing.assert_close(got.router_logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.hidden, hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.layer_out, routed, atol=1e-5, rtol=1e-5)
        # Every expert's output, checked against transformers' own expert module.
        experts = model.model.layers[layer].mlp.experts
        ones = torch.ones(len(hidden), 1)
        for expert in range(ckpt.shape.num_experts):
            alone = experts(hidden, torch.full((len(hidden), 1), expert), ones)
            torch.testing.assert_close(got.expert_out[:, expert], alone, atol=1e-5, rtol=1e-5)
        # The routed output is the gate-weighted sum of the chosen experts' outputs.
        picked = got.expert_out[torch.arange(len(hidden)).unsqueeze(1), chosen]
        torch.testing.assert_close(torch.einsum("tk,tkh->th", weights, picked), got.layer_out, atol=1e-4, rtol=1e-5)
        if not family.startswith("deepseek"):
            recomposed = moe_output(got.router_logits, got.expert_out, range(8), signals.top_k, signals.renormalise)
            torch.testing.assert_close(recomposed, got.layer_out, atol=1e-4, rtol=1e-5)


def load_tokens(calib_dir: Path) -> list[list[int]]:
    from safetensors.torch import load_file

    data = load_file(str(calib_dir / calibration.TOKENS_FILE))
    return [data["input_ids"][data["seq_index"] == i].tolist() for i in range(int(data["seq_index"].max()) + 1)]


def test_manifest_provenance_and_budget(tiny_root, prompts_file, tmp_path):
    model_dir = tiny_checkpoint("mixtral", tiny_root)
    out = run_calibration(
        model_dir, prompts_file, tmp_path / "calib", max_tokens=40, max_seq_len=15, seed=3, progress=False
    )
    manifest = read_manifest(out)
    assert manifest["model"]["fingerprint"] == Checkpoint.open(model_dir).fingerprint
    prompts = manifest["prompts"]
    assert prompts["file"] == str(prompts_file.resolve()) and prompts["prompts_in_file"] == len(PROMPTS)
    assert prompts["tokens"] == 40 and prompts["seed"] == 3 and prompts["max_seq_len"] == 15
    token_ids = load_tokens(out)
    assert [len(ids) for ids in token_ids] == [15, 15, 10]
    assert len(prompts["lines"]) == prompts["sequences"] == 3
    layer_files = [f"layer_{i:03d}.safetensors" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [*layer_files, "manifest.json", "tokens.safetensors"]


def test_selection_is_seeded_and_chat_prompts_use_the_template(tiny_root, prompts_file):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint("olmoe", tiny_root)))
    prompts = read_prompts(prompts_file)
    first = select_sequences(prompts, tokenizer, 10_000, 1000, seed=0)
    assert select_sequences(prompts, tokenizer, 10_000, 1000, seed=0) == first
    assert sorted(line for line, _ in first) == [1, 2, 3, 4]
    assert [line for line, _ in select_sequences(prompts, tokenizer, 10_000, 1000, seed=1)] != [l for l, _ in first]
    chat = dict(first)[3]
    assert tokenizer.decode(chat).startswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>")
    assert dict(first)[1][0] != tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"prompts.jsonl:2: not valid JSON"),
        ('{"prompt": "ok"}\n\n["a list"]\n', r"prompts.jsonl:3: expected a JSON object"),
        ('{"question": "?"}\n', r"prompts.jsonl:1: expected a 'prompt', 'text' or 'messages' field"),
        ('{"messages": [{"role": "user"}]}\n', r"prompts.jsonl:1: 'messages' must be"),
        ('{"prompt": ""}\n', r"prompts.jsonl:1: 'prompt' must be a non-empty string"),
        ("\n\n", r"contains no prompts"),
    ],
)
def test_bad_prompt_files_are_refused_with_their_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(PromptError, match=message):
        read_prompts(path)


def test_loading_is_lazy_and_checked(tiny_root, prompts_file, tmp_path):
    model_dir = tiny_checkpoint("qwen2_moe", tiny_root)
    out = run_calibration(model_dir, prompts_file, tmp_path / "calib", max_tokens=20, progress=False)
    with pytest.raises(CalibrationError, match="was recorded on model"):
        load_calibration(out, fingerprint="sha256:other")
    (out / "layer_001.safetensors").unlink()
    signals = load_calibration(out)  # no layer file is read yet
    assert signals.layer(0).tokens == 20
    with pytest.raises(CalibrationError, match="layer_001.safetensors"):
        signals.layer(1)
    with pytest.raises(CalibrationError, match="no manifest.json"):
        load_calibration(tmp_path)


def test_cli_calibrate_and_its_user_errors(tiny_root, prompts_file, tmp_path, capsys):
    model_dir = tiny_checkpoint("qwen3_moe", tiny_root)
    out = tmp_path / "calib"
    args = ["calibrate", "--model", str(model_dir), "--prompts", str(prompts_file), "--max-tokens", "30"]
    assert main([*args, "--out", str(out)]) == 0
    assert "30 tokens" in capsys.readouterr().out
    assert main([*args, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    missing = ["calibrate", "--model", str(model_dir), "--prompts", str(tmp_path / "nope.jsonl")]
    assert main([*missing, "--out", str(tmp_path / "x")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_dense_model_is_refused(tmp_path, prompts_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1
    )
    LlamaForCausalLM(config).save_pretrained(dense)
    with pytest.raises(UserError, match="model_type 'llama' is not supported"):
        run_calibration(dense, prompts_file, tmp_path / "calib", progress=False)
    assert not (tmp_path / "calib").exists()


def test_quantized_checkpoint_is_refused(tiny_root, tmp_path, prompts_file):
    model_dir = tmp_path / "fp8"
    shutil.copytree(tiny_checkpoint("deepseek_v3", tiny_root), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"quantized \(fp8\)"):
        run_calibration(model_dir, prompts_file, tmp_path / "calib", progress=False)
