"""``vllm-moe-prune trace``: replay prompts through vLLM with routing capture -> a trace shard."""

from __future__ import annotations

import argparse
import logging
import time

from vllm_moe_prune.prompts import read_prompts, tokenize
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.traces import FULL_VARIANT, ShardMeta, write_shard

logger = logging.getLogger(__name__)

HELP = """\
Run prompts through an offline vLLM engine with routing capture on and write the
routing statistics (per layer and expert: routed tokens, router probability, gate
weight; layer-to-layer transitions) as one trace shard into TRACE_DIR.

  vllm-moe-prune trace --model DIR --prompts prompts.jsonl --out traces/ --label python

Prompts are JSONL: one object per line with "prompt" or "text" (completion shape) or
"messages" (OpenAI chat shape, rendered with the model's chat template). With --plan the
pruned variant is traced; its statistics are still stored in original expert ids.
Prompt text and token ids are never stored in the trace.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "trace", help="replay prompts through vLLM and record routing", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (safetensors)")
    parser.add_argument("--prompts", required=True, help="JSONL file of prompts")
    parser.add_argument("--out", required=True, help="trace directory to add a shard to (created if missing)")
    parser.add_argument("--plan", help="trace this plan's pruned variant instead of the full model")
    parser.add_argument("--label", default="default", help="traffic label stored in the shard (e.g. a domain)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (default: the checkpoint's)")
    parser.add_argument("--sample-rate", type=float, default=0.0,
                        help="also store per-token top-k ids and probabilities of this share of tokens (0..1)")
    parser.add_argument("--sample-capacity", type=int, default=65536, help="most samples kept (default 65536)")
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower run)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_moe_prune_plugins.offline import TracingLLM

    ckpt = Checkpoint.open(args.model)
    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None:
        plan.validate_for(ckpt)
    prompts = read_prompts(args.prompts)
    if not 0.0 <= args.sample_rate <= 1.0:
        raise UserError(f"--sample-rate {args.sample_rate}: must be between 0 and 1")
    engine = TracingLLM(
        args.model, args.plan, sample_capacity=args.sample_capacity if args.sample_rate else 0,
        dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=0,
    )
    with engine:
        tokenizer = engine.llm.get_tokenizer()
        inputs = [tokenize(p, tokenizer)[: args.max_model_len - args.max_tokens] for p in prompts]
        if args.sample_rate:
            engine.set_sample_rate(args.sample_rate)
        start = time.time()
        stats, _, samples = engine.trace(inputs, args.max_tokens)
        end = time.time()
    meta = ShardMeta(
        fingerprint=ckpt.fingerprint, start=start, end=end, label=args.label,
        variant=plan.plan_id if plan else FULL_VARIANT, kept=plan.kept if plan else None,
    )
    path = write_shard(args.out, stats, meta, samples)
    sampled = f", {len(samples)} sampled" if samples is not None else ""
    print(f"traced {stats.tokens} tokens{sampled} of {len(prompts)} prompts -> {path}")
    return 0
