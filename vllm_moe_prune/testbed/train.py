"""Train the built-in testbed: a small Qwen3-MoE language model over four text domains.

Reproduce the committed checkpoint with::

    python -m vllm_moe_prune.testbed.train --out vllm_moe_prune/testbed/model --seed 0

It trains its own byte-level BPE tokenizer, then the model, on CPU, from text that a
fresh machine already has (see :mod:`vllm_moe_prune.testbed.corpus`). Balanced batches
(every domain equally often) and a load-balancing loss make the experts specialise by
domain; the report written beside the model shows it (per-domain held-out perplexity and
the Jensen-Shannon divergence between the domains' expert-usage distributions).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moe_prune.testbed.corpus import DOMAINS, domain_split

logger = logging.getLogger(__name__)

VOCAB_SIZE = 2048
SEQ_LEN = 128
#: Characters of each domain's train split used for the tokenizer and the model: enough
#: for a model this size, small enough to tokenize in seconds.
TRAIN_CHARS = 4_000_000
TOKENIZER_CHARS = 600_000
HELDOUT_CHUNKS = 24
TRAFFIC_PROMPTS = 48


def model_config(vocab_size: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def train_tokenizer(texts: dict[str, str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t[:TOKENIZER_CHARS] for t in texts.values()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>")
    fast.save_pretrained(out)
    return fast


def _chunks(text: str, rng: random.Random, count: int, length: int) -> list[str]:
    """``count`` random windows of ``length`` characters, starting at a line start."""
    out = []
    for _ in range(count):
        start = text.rfind("\n", 0, rng.randrange(0, len(text) - length)) + 1
        out.append(text[start : start + length])
    return out


def write_datasets(out: Path, splits: dict[str, tuple[str, str]], seed: int) -> None:
    """Held-out evaluation text and traffic-like prompts of every domain, beside the model."""
    rng = random.Random(seed)
    for domain, (train, heldout) in splits.items():
        folder = out / "data" / domain
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "heldout.jsonl", "w") as f:
            for text in _chunks(heldout, rng, HELDOUT_CHUNKS, 600):
                f.write(json.dumps({"text": text}) + "\n")
        with open(folder / "traffic.jsonl", "w") as f:
            for text in _chunks(train, rng, TRAFFIC_PROMPTS, 240):
                f.write(json.dumps({"prompt": text, "domain": domain}) + "\n")


@torch.no_grad()
def evaluate(model, tokenizer, data_dir: Path) -> dict:
    """Held-out perplexity per domain and per-layer JS divergence of domain expert usage."""
    model.eval()
    cfg = model.config
    usage = {}
    ppl = {}
    for domain in DOMAINS:
        nll, count = 0.0, 0
        hist = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.float64)
        for line in open(data_dir / domain / "heldout.jsonl"):
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[:, :256]
            out = model(ids, labels=ids, output_router_logits=True)
            nll += out.loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
            for layer, logits in enumerate(out.router_logits):
                top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
                hist[layer] += torch.bincount(top, minlength=cfg.num_experts).double()
        ppl[domain] = math.exp(nll / count)
        usage[domain] = hist / hist.sum(dim=1, keepdim=True)
    js = []
    for layer in range(cfg.num_hidden_layers):
        pairs = {}
        for i, a in enumerate(DOMAINS):
            for b in DOMAINS[i + 1 :]:
                pairs[f"{a}|{b}"] = _js_divergence(usage[a][layer], usage[b][layer])
        js.append(pairs)
    model.train()
    return {"heldout_perplexity": ppl, "expert_usage_js_divergence_bits": js}


def _js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def train(out: Path, seed: int, steps: int, batch_per_domain: int, lr: float) -> dict:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("reading the four domains")
    splits = {d: domain_split(d) for d in DOMAINS}
    train_text = {}
    for domain, (train_split, _) in splits.items():
        # A seeded random sample of windows keeps huge domains (C headers) bounded.
        text = train_split if len(train_split) <= TRAIN_CHARS else "\n".join(_chunks(train_split, rng, TRAIN_CHARS // 4000, 4000))
        train_text[domain] = text
    tokenizer = train_tokenizer(train_text, out)
    write_datasets(out, splits, seed)
    streams = {d: torch.tensor(tokenizer(t).input_ids, dtype=torch.long) for d, t in tqdm(train_text.items(), desc="tokenize")}

    model = Qwen3MoeForCausalLM(model_config(len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    started = time.time()
    bar = tqdm(range(steps), desc="train")
    for step in bar:
        batch = []
        for stream in streams.values():
            starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch_per_domain,), generator=gen)
            batch += [stream[s : s + SEQ_LEN] for s in starts.tolist()]
        ids = torch.stack(batch)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.config.output_router_logits = False
    model.save_pretrained(out)
    report = evaluate(model, tokenizer, out / "data")
    report.update(seed=seed, steps=steps, batch_per_domain=batch_per_domain, lr=lr, seq_len=SEQ_LEN,
                  train_seconds=round(time.time() - started, 1),
                  command=f"python -m vllm_moe_prune.testbed.train --out {out} --seed {seed} --steps {steps} "
                          f"--batch-per-domain {batch_per_domain} --lr {lr}")
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-per-domain", type=int, default=8, help="sequences of every domain in each batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = train(args.out, args.seed, args.steps, args.batch_per_domain, args.lr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
