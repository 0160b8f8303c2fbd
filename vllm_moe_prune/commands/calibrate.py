"""``vllm-moe-prune calibrate``: record every expert's output on a small prompt sample.

Only the reconstruction-based methods need this (NAEE enumeration, MoE Pathfinder,
Mosaic Pruning, EAN/REAP output norms); frequency-style methods plan from traces alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_moe_prune.calibration import DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_TOKENS, read_manifest, run_calibration

HELP = "record expert outputs on a small prompt sample (for reconstruction-based methods)"

DESCRIPTION = """\
Run the model with transformers, one decoder layer at a time (a model larger than RAM is
never loaded whole), on a sample of prompts, and record per MoE layer: router logits, the
output of every expert on every token, the layer's routed output and its input.

Prompts: JSONL, one object per line with "prompt" or "text" (a string) or "messages"
(OpenAI chat format, rendered with the model's chat template). Prompts are taken in a
seeded random order until --max-tokens tokens; each is cut to --max-seq-len tokens.

Disk use per MoE layer is about tokens x (experts + 3) x hidden x 4 bytes: keep the
sample small (a few thousand tokens is what the published methods use).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "calibrate", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory (safetensors)")
    parser.add_argument("--prompts", type=Path, required=True, help="calibration prompts, JSONL")
    parser.add_argument("--out", type=Path, required=True, help="calibration directory to create (must not exist)")
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"token budget (default {DEFAULT_MAX_TOKENS})"
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=DEFAULT_MAX_SEQ_LEN,
        help=f"longest sequence in tokens (default {DEFAULT_MAX_SEQ_LEN})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt order (default 0)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    out = run_calibration(
        args.model, args.prompts, args.out, max_tokens=args.max_tokens, max_seq_len=args.max_seq_len, seed=args.seed
    )
    manifest = read_manifest(out)
    prompts = manifest["prompts"]
    fingerprint = manifest["model"]["fingerprint"]
    print(f"{out}: {prompts['sequences']} sequences, {prompts['tokens']} tokens, model {fingerprint}")
    return 0
