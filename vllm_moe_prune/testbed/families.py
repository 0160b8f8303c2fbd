"""Tiny random checkpoints of every MoE family users bring, for tests that must be able to fail.

The loader, exporter, calibration and capture read real tensor names and config keys, so
each checkpoint is built by the family's own transformers class and written with
``save_pretrained``: whatever names and keys transformers writes, the tests see. Each one
is shape-faithful to the real models where vLLM's CPU kernels care (hidden size a multiple
of 32, head_dim 32 or 64, MLA with ``kv_lora_rank`` 512 and ``qk_rope_head_dim`` 64,
gated SiLU experts) and tiny everywhere else (3 layers, 8 experts, top-2, vocab 512).

Weights are drawn with ``initializer_range`` 0.3 instead of the default 0.02: with the
default, a random model barely uses its experts and pruning tests pass whatever the code
does. DeepSeek-V3 also gets a random ``e_score_correction_bias`` (transformers initialises
it to zeros), so selection really depends on it.

Usage::

    python -m vllm_moe_prune.testbed.families --out DIR [--family NAME]

writes ``DIR/NAME`` for every family (or only ``NAME``).
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Any

import torch

from vllm_moe_prune.atomic import atomic_directory

logger = logging.getLogger(__name__)

FAMILY_NAMES: tuple[str, ...] = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")

VOCAB_SIZE = 512
NUM_EXPERTS = 8
TOP_K = 2
INITIALIZER_RANGE = 0.3
#: Specials of the tiny tokenizer: ids 0 and 1 are BOS and EOS in every config below.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
#: ChatML-like template, so that chat-style prompts ("messages") work in vLLM and calibration.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_experts_per_tok": TOP_K,
    "max_position_embeddings": 512,
    "initializer_range": INITIALIZER_RANGE,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "dtype": "float32",
}

#: Grouped-query attention with head_dim 32 (two query heads, one KV head).
_GQA: dict[str, Any] = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}

#: Multi-head latent attention in the only shape vLLM's CPU MLA kernel accepts. Every query
#: head has its own latent K/V, so transformers needs as many KV heads as query heads.
_MLA: dict[str, Any] = {
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    # YaRN, shaped like every released DeepSeek-V2/V3 config (factor 40 over 4096 there).
    # It also keeps vLLM's CPU build on its correct rotary path: its fused rotary kernel
    # mis-rotates MLA's 3-D query and strided key, which plain-rope MLA would use.
    "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    },
}

#: Per family: the config beyond :data:`_COMMON`. Each picks the routing variant its real
#: models use, so the tests cover renormalising and non-renormalising routers, shared
#: experts, dense leading layers and both kinds of grouped top-k.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {**_GQA, "intermediate_size": 64, "num_local_experts": NUM_EXPERTS},
    "olmoe": {
        **_GQA,
        "intermediate_size": 64,
        "num_experts": NUM_EXPERTS,
        "norm_topk_prob": False,
    },
    "qwen2_moe": {
        **_GQA,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_experts": NUM_EXPERTS,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        **_GQA,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "num_experts": NUM_EXPERTS,
        "norm_topk_prob": True,
    },
    # DeepSeek-V2: softmax router, group-limited greedy (group score = max), no renormalisation.
    "deepseek_v2": {
        **_MLA,
        "q_lora_rank": None,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": NUM_EXPERTS,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "group_limited_greedy",
        "scoring_func": "softmax",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    },
    # DeepSeek-V3: sigmoid scores, score-correction bias, group score = sum of the top two,
    # renormalised and scaled. transformers always scores V3 with a sigmoid, vLLM only with
    # scoring_func "sigmoid" (its default is softmax), and creates the bias only with
    # topk_method "noaux_tc": the released V3 configs set both, and so does this one.
    "deepseek_v3": {
        **_MLA,
        "q_lora_rank": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": NUM_EXPERTS,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
}


def _tokenizer_corpus(seed: int) -> list[str]:
    """Deterministic mixed text (prose, code, arithmetic) to train the tiny BPE on.

    Generated rather than read from disk so the tokenizer is the same on every machine.
    """
    rng = random.Random(seed)
    words = (
        "the of and to in is that for it as with was on be by this are from or have an they which "
        "one you were her all she there would their we him been has when who will more no if out so "
        "said what up its about into than them can only other new some could time these two may then "
        "do first any my now such like our over man me even most made after also did many before must "
        "through back years where much your way well down should because each just those people how"
    ).split()
    code = (
        "def return import class self None True False if else elif for while in range len print "
        "int float str list dict tuple yield lambda with as try except raise pass break continue "
        "struct void char static const unsigned include define typedef sizeof"
    ).split()
    lines = []
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + ".")
        name = rng.choice(words)
        lines.append(f"def {name}_{rng.choice(code)}(x, y={rng.randint(0, 99)}):\n    return x {rng.choice('+-*/')} y")
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{a} + {b} = {a + b}; {a} * {b} = {a * b}")
    return lines


def save_tiny_tokenizer(out_dir: Path, seed: int = 0) -> int:
    """Train and save a byte-level BPE of at most :data:`VOCAB_SIZE` tokens; returns its size.

    Byte-level, so any text (and any prompt file a test throws at it) encodes without
    unknown tokens; saved through transformers so vLLM and ``AutoTokenizer`` load it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], pad_token=SPECIAL_TOKENS[1]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(fast)


def build_tiny_model(family: str, seed: int = 0):
    """The random transformers model of ``family`` (float32, eval mode), not yet saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILY_NAMES)}")
    config = AutoConfig.for_model(family, **_COMMON, **FAMILY_CONFIGS[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if family == "deepseek_v3":
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(gate, "e_score_correction_bias"):
                    bias = gate.e_score_correction_bias
                    bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    return model


def make_tiny_checkpoint(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``family`` with a tokenizer to ``out_dir`` (new).

    Written atomically: ``out_dir`` appears complete or not at all.
    """
    out_dir = Path(out_dir)
    model = build_tiny_model(family, seed)
    with atomic_directory(out_dir) as tmp:
        size = save_tiny_tokenizer(tmp, seed)
        if size > model.config.vocab_size:
            raise AssertionError(f"tokenizer has {size} tokens, more than vocab_size {model.config.vocab_size}")
        model.save_pretrained(tmp)
    logger.info("wrote tiny %s checkpoint to %s", family, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to create DIR/FAMILY checkpoints in")
    parser.add_argument("--family", choices=FAMILY_NAMES, help="only this family (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    for family in [args.family] if args.family else FAMILY_NAMES:
        print(make_tiny_checkpoint(family, args.out / family, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
