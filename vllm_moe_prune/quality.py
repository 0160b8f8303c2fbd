"""Quality figures of a variant: held-out perplexity per domain and ratios to the full model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def perplexity(token_logprobs: Iterable[torch.Tensor]) -> float:
    """exp of the mean negative log-probability over all scored tokens (NaN entries skipped)."""
    total, count = 0.0, 0
    for values in token_logprobs:
        scored = values[~torch.isnan(values)]
        total += float(scored.sum())
        count += scored.numel()
    if count == 0:
        raise ValueError("no scored tokens: every sequence needs at least two tokens")
    return math.exp(-total / count)


def ratio_summary(pruned: Mapping[str, float], full: Mapping[str, float], unseen: Iterable[str] = ()) -> dict[str, float]:
    """Geometric mean of per-domain perplexity ratios (pruned / full), and the worst unseen one.

    ``unseen`` are the domains the plan's statistics did not come from: Mosaic's claim is
    that quality holds there too.
    """
    ratios = {domain: pruned[domain] / full[domain] for domain in full}
    summary = {"geomean_ratio": math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))}
    unseen = [d for d in unseen if d in ratios]
    if unseen:
        summary["worst_unseen_ratio"] = max(ratios[d] for d in unseen)
    return summary
