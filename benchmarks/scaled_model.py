"""A random-weight Qwen3-MoE with the testbed's tokenizer and traffic, at larger layer sizes.

The testbed's MoE layers are tiny (hidden 128, 16 experts of width 128), so fixed per-layer
costs such as routing capture weigh far more there than next to real experts. Costs like
that do not depend on the weights' values, so a random model of realistic layer shape
measures them honestly (its text is nonsense; only its speed is used):

    python benchmarks/scaled_model.py --out runs/scaled-model
    flock /tmp/vllm-engine.lock python benchmarks/tracing_overhead.py --model runs/scaled-model \\
        --variants stock capture --reps 2 --rounds 8 --micro-tokens 64 1088 --no-profile \\
        --results-name tracing_overhead_scaled
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from vllm_moe_prune.atomic import atomic_directory
from vllm_moe_prune.testbed import TESTBED_MODEL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="new directory for the checkpoint")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (testbed: 128)")
    parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (testbed: 16)")
    parser.add_argument("--top-k", type=int, default=6, help="experts per token (testbed: 2)")
    parser.add_argument("--expert-width", type=int, default=256, help="moe_intermediate_size (testbed: 128)")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers, all MoE (testbed: 4)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = json.loads((TESTBED_MODEL / "config.json").read_text())
    config.update(
        hidden_size=args.hidden, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_width, intermediate_size=2 * args.expert_width,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        head_dim=64,
    )
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy2(TESTBED_MODEL / name, tmp / name)
        shutil.copytree(TESTBED_MODEL / "data", tmp / "data")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
