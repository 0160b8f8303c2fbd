"""An offline vLLM engine with routing capture: what ``trace``, the demo and tests drive.

It serves the full model or a plan's variant with the flags of
:func:`vllm_moe_prune.serving.engine_args`, turns capture on only after vLLM's start-up
(so warm-up and profiling passes are never counted), and hands back statistics as
:class:`~vllm_moe_prune.stats.RoutingStats` in original expert ids.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from vllm_moe_prune.stats import RoutingStats
from vllm_moe_prune.traces import Samples
from vllm_moe_prune.serving import engine_args


def prompt_logprobs(llm: Any, prompts_token_ids: list[list[int]]) -> list[torch.Tensor]:
    """Log-probability a ``vllm.LLM`` gives each prompt token (position 0 has none: NaN).

    The quantity behind held-out perplexity and every equivalence test with transformers.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts_token_ids],
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
        use_tqdm=False,
    )
    result = []
    for ids, out in zip(prompts_token_ids, outs):
        values = [math.nan] + [out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
        result.append(torch.tensor(values, dtype=torch.float64))
    return result


def samples_from_rpc(raw: dict[str, Any] | None) -> Samples | None:
    """The worker's sample lists as trace-format :class:`Samples` (None: none taken)."""
    if not raw or not raw["topk_ids"]:
        return None
    return Samples(
        topk_ids=torch.tensor(raw["topk_ids"], dtype=torch.int32),
        topk_probs=torch.tensor(raw["topk_probs"], dtype=torch.float32),
    )


class TracingLLM:
    """``vllm.LLM`` plus the worker-extension calls of this plugin."""

    def __init__(
        self, model: str | Path, plan: str | Path | None = None, sample_capacity: int = 0, **llm_kwargs: Any
    ) -> None:
        from vllm import LLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Workers read it at model construction (settings.SampleSettings).
        os.environ["MOE_PRUNE_SAMPLE_CAPACITY"] = str(sample_capacity)
        self.args = engine_args(model, plan)
        self.llm = LLM(**self.args, **llm_kwargs)

    def set_tracing(self, on: bool) -> None:
        self.llm.collective_rpc("moe_prune_set_active", args=(on,))

    def set_sample_rate(self, rate: float) -> None:
        self.llm.collective_rpc("moe_prune_set_sample_rate", args=(rate,))

    def drain(self, with_samples: bool = False) -> tuple:
        """Statistics since the last drain and the variant's load info (and the samples).

        Tensor-parallel workers see the same tokens and route them identically, so the
        first worker's statistics are the engine's (adding them would count tokens twice).
        """
        first = self.llm.collective_rpc("moe_prune_drain")[0]
        stats = RoutingStats.from_dict(first["stats"])
        if not with_samples:
            return stats, first["load_info"]
        return stats, first["load_info"], samples_from_rpc(first["samples"])

    def status(self) -> dict[str, Any]:
        return self.llm.collective_rpc("moe_prune_status")[0]

    def generate(self, prompts: list[Any], sampling_params: Any, use_tqdm: bool = True) -> list[Any]:
        return self.llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def trace(self, prompts_token_ids: list[list[int]], max_tokens: int) -> tuple:
        """Generate greedily for ``prompts_token_ids`` with capture on: ``(stats, load_info, samples)`` of that traffic."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.drain()
        self.set_tracing(True)
        try:
            self.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts_token_ids],
                          SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
        finally:
            self.set_tracing(False)
        return self.drain(with_samples=True)

    def close(self) -> None:
        """Stop the engine's processes now (tests and benchmarks run engines one after another)."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> "TracingLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trace_labelled(
    engine: TracingLLM, traffic: dict[str, list[list[int]]], max_tokens: int = 16,
    trace_dir: str | Path | None = None, fingerprint: str | None = None,
) -> dict[str, RoutingStats]:
    """Replay each label's prompts (greedy) with capture on; one trace shard per label if ``trace_dir``.

    The demo and the benchmarks build their traces this way: one label per traffic
    domain, so a plan can be made from one domain or from all of them.
    """
    from vllm_moe_prune.traces import FULL_VARIANT, ShardMeta, write_shard

    out = {}
    for label, prompts in traffic.items():
        start = time.time()
        stats, _, samples = engine.trace(prompts, max_tokens)
        if trace_dir is not None:
            meta = ShardMeta(fingerprint=fingerprint, start=start, end=time.time(), label=label, variant=FULL_VARIANT)
            write_shard(trace_dir, stats, meta, samples)
        out[label] = stats
    return out
