"""Throughput cost of routing capture: the stock vLLM model vs the plugin's model with counters on.

Target (the issue): at most 3% of throughput lost with the counters on, in production mode
(torch.compile, not eager). Variants, each served by its own engine on the testbed model:

  stock     plain ``vllm.LLM(model=...)``: vLLM's own Qwen3-MoE class, no plugin involved
  capture   ``TracingLLM(model)``: the plugin's model class and loader, counters ON
            (the same engine also runs rounds with counters OFF, interleaved)
  sampling  like capture, plus per-token sampling (``--sample-capacity`` ring rows,
            ``--sample-rate`` of the traced tokens), when the plugin supports it

Every round generates ``--max-tokens`` tokens for the same ``--prompts`` prompts (greedy,
ignore_eos) after one untimed warm-up round. Each of ``--reps`` repetitions starts one
engine per variant and keeps them all alive; they take turns (A B, B A, ...), never
generating at the same time, so the noise of a shared machine (which moves engine
starts 10-25% apart here) hits both sides of a pair of neighbouring rounds alike. The
ratio is taken per pair (round i of capture / round i of stock) and reported as mean
+/- two standard errors over all pairs. Rounds are short by default (32 tokens, about
half a second): this machine's speed drifts by tens of percent within seconds, and
short rounds give many pairs whose halves ran under nearly the same conditions. They
weigh prefill more than long generations do; if anything that overstates capture's
share: its cost is per token, and a prefill token costs the model less than a decode token.

Inside each engine's worker every model forward pass is timed too (wall and the worker
thread's CPU time, which leaves out the time it waits for a core), and the median decode
step of each round is compared the same way, pair by pair.

Then where the time goes: a micro-benchmark of capture's two parts for one forward pass
(one CPU thread): ``RoutingRecorder.record`` per MoE layer (eager at several token counts,
and compiled with torch.compile) and ``RoutingRecorder.count`` once per step (eager), a
profile of ``count``, the estimated share of a round's time they explain, and one more
stock and capture engine each under vLLM's torch profiler.

    flock /tmp/vllm-engine.lock python benchmarks/tracing_overhead.py
    python benchmarks/tracing_overhead.py --reps 1 --rounds 2 --no-write     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import ENGINE_KWARGS, RESULTS, environment, greedy_round, shutdown, spread, traffic_ids, write_results
from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.testbed import TESTBED_MODEL
from vllm_moe_prune.testbed.corpus import DOMAINS

TARGET_LOSS = 0.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TESTBED_MODEL, help="model directory (default: the testbed)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per round, mixed from the four domains' traffic")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per prompt and round")
    parser.add_argument("--reps", type=int, default=3, help="repetitions: each starts one engine per variant, alive together")
    parser.add_argument("--rounds", type=int, default=16,
                        help="timed rounds per repetition and setting (engines take turns)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: torch.compile, production)")
    parser.add_argument("--variants", nargs="+", choices=("stock", "capture", "sampling"),
                        default=["stock", "capture", "sampling"],
                        help="engines to compare (stock is the baseline and always runs)")
    parser.add_argument("--sample-capacity", type=int, default=65536,
                        help="sampling variant: ring rows (MOE_PRUNE_SAMPLE_CAPACITY); 0 skips the variant")
    parser.add_argument("--sample-rate", type=float, default=0.01, help="sampling variant: share of tokens sampled")
    parser.add_argument("--micro-tokens", type=int, nargs="+", default=[1, 8, 64, 256, 2048],
                        help="token counts for the recording micro-benchmark")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the in-engine torch.profiler runs (one extra stock and capture engine)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for tracing_overhead.json/.md")
    parser.add_argument("--results-name", default="tracing_overhead",
                        help="file name (without extension) of the results in --output")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild tracing_overhead.md from the existing tracing_overhead.json; run nothing")
    return parser.parse_args(argv)


def sampling_supported() -> bool:
    """Whether this tree's plugin has per-token sampling (``TracingLLM(..., sample_capacity=N)``)."""
    import inspect

    from vllm_moe_prune_plugins.offline import TracingLLM

    return "sample_capacity" in inspect.signature(TracingLLM.__init__).parameters


def _install_timers(worker: Any) -> int:
    """Run in the engine's worker: time every model forward pass and, on the plugin's model,
    the recorder's per-step ``count`` (counting passes included).

    Each forward is kept as (tokens, wall seconds, thread CPU seconds). The worker computes
    on one thread (vLLM binds it to one core here; the count is returned to check), so
    its thread CPU time is the model's own work: time the worker spends descheduled while
    other processes run, the main noise of this shared machine, is not in it.
    """
    runner = worker.model_runner
    forward = runner._model_forward
    worker.moe_prune_timings = {"forwards": [], "count_s": 0.0}

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        out = forward(*args, **kwargs)
        tokens = kwargs["positions"].shape[-1] if kwargs.get("positions") is not None else -1
        worker.moe_prune_timings["forwards"].append(
            (tokens, time.perf_counter() - wall, time.thread_time() - cpu))
        return out

    runner._model_forward = timed_forward
    recorder = getattr(runner.get_model(), "moe_prune_recorder", None)
    if recorder is not None:
        count = recorder.count

        def timed_count(num_tokens: int) -> None:
            started = time.perf_counter()
            count(num_tokens)
            worker.moe_prune_timings["count_s"] += time.perf_counter() - started

        recorder.count = timed_count
    return torch.get_num_threads()


def _take_timings(worker: Any) -> dict[str, Any]:
    timings, worker.moe_prune_timings = worker.moe_prune_timings, {"forwards": [], "count_s": 0.0}
    return timings


def _step_times(timings: dict[str, Any], decode_tokens: int) -> dict[str, float]:
    """A round's forward passes in brief: count time, and the decode steps (``decode_tokens``
    sequences each; prefill and warm-up shapes differ) by median wall and thread CPU time."""
    decode = [f for f in timings["forwards"] if f[0] == decode_tokens]
    return {
        "count_s": timings["count_s"],
        "forward_s": sum(f[1] for f in timings["forwards"]),
        "decode_steps": len(decode),
        "decode_step_ms": statistics.median(f[1] for f in decode) * 1e3 if decode else float("nan"),
        "decode_step_cpu_ms": statistics.median(f[2] for f in decode) * 1e3 if decode else float("nan"),
    }


class BenchEngine:
    """One variant's engine, alive for a whole repetition so that rounds of every variant
    interleave in time (engines take turns: only one generates at any moment)."""

    def __init__(self, variant: str, args: argparse.Namespace, prompts: list[list[int]]) -> None:
        self.variant, self.args, self.prompts = variant, args, prompts
        self.rounds: dict[str, list[dict[str, float]]] = {}
        self.traced_tokens: list[int] = []
        kwargs = dict(ENGINE_KWARGS, enforce_eager=args.eager)
        saved_env = dict(os.environ)
        started = time.perf_counter()
        try:
            if variant == "stock":
                from vllm import LLM

                self.engine = None
                self.llm = LLM(model=str(args.model.resolve()), **kwargs)
            else:
                from vllm_moe_prune_plugins.offline import TracingLLM

                if variant == "sampling":
                    kwargs["sample_capacity"] = args.sample_capacity
                self.engine = TracingLLM(args.model, None, **kwargs)
                self.llm = self.engine.llm
                if variant == "sampling":
                    self.engine.set_sample_rate(args.sample_rate)
        finally:  # TracingLLM sets the sample capacity for its workers; do not leak it
            os.environ.clear()
            os.environ.update(saved_env)
        self.startup_s = round(time.perf_counter() - started, 1)
        self.worker_threads = self.llm.collective_rpc(_install_timers)[0]
        if self.engine is not None:
            self.engine.set_tracing(True)
        greedy_round(self.llm, prompts, args.max_tokens)  # warm-up, untimed
        if self.engine is not None:
            self.engine.drain()

    def _timed_round(self, setting: str) -> None:
        """One round, with what the worker measured of its forward passes."""
        self.llm.collective_rpc(_take_timings)
        measured = greedy_round(self.llm, self.prompts, self.args.max_tokens)
        measured |= _step_times(self.llm.collective_rpc(_take_timings)[0], len(self.prompts))
        self.rounds.setdefault(setting, []).append(measured)

    def run_round(self) -> None:
        """One timed round; the plugin's engines run one with counters on, then one off."""
        if self.engine is None:
            self._timed_round("stock")
            return
        self.engine.set_tracing(True)
        self._timed_round(self.variant)
        self.engine.set_tracing(False)
        stats, _ = self.engine.drain()
        self.traced_tokens.append(stats.tokens)
        self._timed_round(f"{self.variant}-off")
        off_stats, _ = self.engine.drain()
        if off_stats.tokens:
            raise RuntimeError(f"counters off but {off_stats.tokens} tokens were counted")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        else:
            shutdown(self.llm)

    def result(self, rep: int) -> dict[str, Any]:
        return {"variant": self.variant, "rep": rep, "startup_s": self.startup_s, "rounds": self.rounds,
                "traced_tokens": self.traced_tokens, "worker_threads": self.worker_threads}


# --------------------------------------------------------------------------- micro-benchmark


def _time_calls(fn, calls: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def micro_benchmark(token_counts: list[int], hidden_size: int, num_experts: int, top_k: int,
                    num_layers: int, sample_capacity: int = 0, sample_rate: float = 0.0,
                    compile_tokens: int | None = 64) -> dict[str, Any]:
    """Cost of capture for one forward pass, in its two parts, vs the router work the model does anyway.

    Only the recorder's public methods are called, as the model class calls them: ``record``
    per MoE layer (eager, and at ``compile_tokens`` torch.compile'd the way vLLM compiles
    the model) and ``count`` once per step (eager, as vLLM runs it; it counts the waiting
    tokens every ``COUNT_BATCH_TOKENS``, so its mean over many calls includes those passes).
    """
    from vllm_moe_prune.families import FAMILIES, MoEShape
    from vllm_moe_prune_plugins.capture import RoutingRecorder

    torch.manual_seed(0)
    shape = MoEShape(FAMILIES["qwen3_moe"], tuple(range(num_layers)), num_experts, top_k, True, 1)
    router = torch.randn(num_experts, hidden_size)

    def make(capacity: int = 0) -> RoutingRecorder:
        every = [num_experts] * num_layers  # an unpruned model: every layer routes to all it holds
        rec = RoutingRecorder(shape, hidden_size, max(token_counts), every, every, capacity)
        rec.set_active(True)
        if capacity:
            rec.set_sample_rate(sample_rate)
        return rec

    recorder = make()
    sampler = make(sample_capacity) if sample_capacity else None
    # record alone, repeated without count: off, every call writes the same rows (the same work)
    writer = make()
    writer.set_active(False)

    def route(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # what the model computes
        logits = hidden @ router.t()
        weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        return logits, weights, ids

    def record_all(rec: RoutingRecorder, hidden: torch.Tensor, routed) -> None:
        for slot in range(num_layers):
            rec.record(slot, hidden, *routed)

    def forward_router(hidden: torch.Tensor, rec: RoutingRecorder | None = None) -> list:
        """The model's own routing, every layer, recorded by ``rec`` as the plugin's router does."""
        out = []
        for slot in range(num_layers):
            out.append(route(hidden))
            if rec is not None:
                rec.record(slot, hidden, *out[-1])
        return out

    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, hidden_size)
        routed = route(hidden)
        calls = max(10, min(500, 5000 // tokens))
        rows.append({
            "tokens": tokens,
            "record_us_per_layer": _time_calls(lambda: record_all(writer, hidden, routed), calls) * 1e6 / num_layers,
            "count_us_per_step": _time_calls(lambda: recorder.count(tokens), calls) * 1e6,
            "sampling_count_us_per_step": (_time_calls(lambda: sampler.count(tokens), calls) * 1e6
                                           if sampler is not None else None),
            "router_us_per_layer": _time_calls(lambda: forward_router(hidden), calls) * 1e6 / num_layers,
        })
    compiled: dict[str, Any] = {}
    if compile_tokens:
        hidden = torch.randn(compile_tokens, hidden_size)
        try:
            t0 = time.perf_counter()
            # The router with recording vs without, both compiled: the difference is record's share.
            rec_c = torch.compile(lambda h: forward_router(h, writer), dynamic=False)
            route_c = torch.compile(forward_router, dynamic=False)
            rec_c(hidden), route_c(hidden)
            routed_us = _time_calls(lambda: rec_c(hidden), 500) * 1e6 / num_layers
            router_us = _time_calls(lambda: route_c(hidden), 500) * 1e6 / num_layers
            compiled = {
                "tokens": compile_tokens,
                "record_us_per_layer": routed_us - router_us,
                "router_us_per_layer": router_us,
                "compile_s": time.perf_counter() - t0,
            }
        except Exception as exc:  # noqa: BLE001 - report, do not lose the engine results
            compiled = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    profile_tokens = 64 if 64 in token_counts else token_counts[0]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            recorder.count(profile_tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "calls_per_step": e.count / 50, "self_us_per_step": e.self_cpu_time_total / 50,
            "share": e.self_cpu_time_total / total} for e in events[:12]]
    return {"dims": {"hidden": hidden_size, "experts": num_experts, "top_k": top_k, "layers": num_layers},
            "count_batch_tokens": recorder.count_batch_tokens,
            "rows": rows, "compiled": compiled, "profile_tokens": profile_tokens, "profile_top": top,
            "profile_self_us_per_step": total / 50, "aten_ops_per_step": sum(e.count for e in events) / 50}


def profile_in_engine(variant: str, args: argparse.Namespace, prompts: list[list[int]], profile_dir: Path
                      ) -> dict[str, Any]:
    """One engine of ``variant``, one round under vLLM's torch profiler: the worker's CPU time by entry."""
    import re
    import shutil

    shutil.rmtree(profile_dir, ignore_errors=True)
    profiler = {"profiler": "torch", "torch_profiler_dir": str(profile_dir.resolve()), "torch_profiler_with_stack": False}
    kwargs = dict(ENGINE_KWARGS, enforce_eager=args.eager, profiler_config=profiler)
    if variant == "stock":
        from vllm import LLM

        llm = LLM(model=str(args.model.resolve()), **kwargs)
        close = lambda: shutdown(llm)  # noqa: E731
    else:
        from vllm_moe_prune_plugins.offline import TracingLLM

        engine = TracingLLM(args.model, None, **kwargs)
        engine.set_tracing(True)
        llm, close = engine.llm, engine.close
    try:
        greedy_round(llm, prompts, 16)
        llm.start_profile()
        greedy_round(llm, prompts, args.max_tokens)
        llm.stop_profile()
    finally:
        close()
    tables = sorted(profile_dir.glob("*profiler_out.txt"))
    if not tables:
        return {"error": f"no profiler table written under {profile_dir}"}
    text = tables[0].read_text()
    scale = {"s": 1e6, "ms": 1e3, "us": 1.0}

    def us(value: str) -> float:
        number, unit = re.fullmatch(r"([0-9.]+)(s|ms|us)", value).groups()
        return float(number) * scale[unit]

    rows: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 7 and re.fullmatch(r"[0-9.]+(s|ms|us)", parts[-5]):
            name = " ".join(parts[:-6])
            if name.startswith("execute_context_"):  # one row per batch shape: summed below
                name = "execute_context (model step, all shapes)"
            row = rows.setdefault(name, {"self_us": 0.0, "total_us": 0.0, "calls": 0})
            row["self_us"] += us(parts[-5])
            row["total_us"] += us(parts[-3])
            row["calls"] += int(parts[-1])
    total = re.search(r"Self CPU time total: ([0-9.]+)(s|ms|us)", text)
    return {"worker_cpu_us": us(total.group(1) + total.group(2)) if total else None, "rows": rows,
            "table_file": str(tables[0])}


# --------------------------------------------------------------------------- report


def _paired_ratios(engines: list[dict[str, Any]], setting: str, baseline: str, key: str) -> list[float]:
    """``key`` of round i of ``setting`` / of round i of ``baseline``, in each repetition: the
    engines take turns, so the two rounds of a pair ran next to each other in time."""
    ratios = []
    for rep in sorted({e["rep"] for e in engines}):
        in_rep = [e for e in engines if e["rep"] == rep]
        base = [r[key] for e in in_rep for r in e["rounds"].get(baseline, []) if key in r]
        values = [r[key] for e in in_rep for r in e["rounds"].get(setting, []) if key in r]
        ratios += [v / b for v, b in zip(values, base)]
    return ratios


def summarise(engines: list[dict[str, Any]], baseline: str = "stock") -> dict[str, Any]:
    settings = sorted({name for e in engines for name in e["rounds"]}, key=lambda n: (n != baseline, n))
    pooled = {name: [r for e in engines for r in e["rounds"].get(name, [])] for name in settings}
    per_setting = {}
    for name in settings:
        per_setting[name] = {
            "output_tok_s": spread([r["output_tok_s"] for r in pooled[name]]),
            "total_tok_s": spread([r["total_tok_s"] for r in pooled[name]]),
        }
        if name != baseline:
            pairs = _paired_ratios(engines, name, baseline, "output_tok_s")
            per_setting[name]["ratio_to_stock"] = spread(pairs) | {"pairs": pairs}
            # the same pairs by the worker's thread CPU time per decode step (a cost: lower is better)
            pairs = _paired_ratios(engines, name, baseline, "decode_step_cpu_ms")
            if pairs:
                per_setting[name]["step_cpu_ratio_to_stock"] = spread(pairs) | {"pairs": pairs}
    # CPU cost: output tokens per CPU-second of the whole process tree, pooled rounds
    base_cpu = statistics.median([r["output_tok_per_cpu_s"] for r in pooled[baseline]])
    for name in settings:
        cpu = statistics.median([r["output_tok_per_cpu_s"] for r in pooled[name]])
        per_setting[name]["output_tok_per_cpu_s"] = spread([r["output_tok_per_cpu_s"] for r in pooled[name]])
        per_setting[name]["cpu_ratio_to_stock"] = cpu / base_cpu
        per_setting[name]["pooled_median_ratio_to_stock"] = (
            per_setting[name]["output_tok_s"]["median"] / per_setting[baseline]["output_tok_s"]["median"])
        # Other work on the machine only ever slows a round down: the best rounds are the
        # least disturbed estimate of each setting's own speed.
        per_setting[name]["best_round_ratio_to_stock"] = (
            per_setting[name]["output_tok_s"]["max"] / per_setting[baseline]["output_tok_s"]["max"])
        # Inside the worker: the median decode step of each round, by wall and thread CPU time
        for key in ("decode_step_ms", "decode_step_cpu_ms"):
            values = [r[key] for r in pooled[name] if key in r]
            if values:
                per_setting[name][key] = spread(values)
                per_setting[name][f"{key}_ratio_to_stock"] = (
                    per_setting[name][key]["median"] / statistics.median(r[key] for r in pooled[baseline]))
        counted = [r for r in pooled[name] if r.get("count_s")]
        if counted:
            per_setting[name]["count_share"] = spread([r["count_s"] / r["seconds"] for r in counted])
            per_setting[name]["count_ms_per_round"] = spread([r["count_s"] * 1e3 for r in counted])
    return per_setting


def _mean_and_margin(pairs: list[float]) -> tuple[float, float]:
    """Mean of paired ratios and two standard errors of it."""
    margin = 2 * statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("inf")
    return statistics.mean(pairs), margin


def _verdict(lost: float, margin: float) -> str:
    """Whether ``lost`` +/- ``margin`` (two standard errors) is within the target."""
    if lost + margin <= TARGET_LOSS:
        return "met"
    if lost - margin > TARGET_LOSS:
        return "MISSED"
    return "not settled by this run"


def _worker_lines(summary: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The in-worker table: each round's median decode step, by wall and by the worker's
    thread CPU time (which leaves out time spent descheduled), and the verdict by the latter."""
    lines = [
        "Inside the worker (timed around every model forward pass; a decode step is one forward of all the "
        "round's sequences, whose median per round is taken; thread CPU time leaves out the time the worker "
        "waits for a core, so other work on the machine disturbs it much less than wall time):", "",
        "| setting | decode step, wall ms (median) | decode step, thread CPU ms (median, min..max) | "
        "CPU per step vs stock (pooled medians) | CPU per step vs stock (mean of pairs +/- 2 SE) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        if "decode_step_cpu_ms" not in s:
            continue
        cpu = s["decode_step_cpu_ms"]
        paired = ""
        if "step_cpu_ratio_to_stock" in s:
            mean, margin = _mean_and_margin(s["step_cpu_ratio_to_stock"]["pairs"])
            paired = f"{(mean - 1) * 100:+.1f}% +/- {margin * 100:.1f}%"
        lines.append(f"| {labels.get(name, name)} | {s['decode_step_ms']['median']:.2f} | {cpu['median']:.2f} "
                     f"({cpu['min']:.2f}..{cpu['max']:.2f}) | {(s['decode_step_cpu_ms_ratio_to_stock'] - 1) * 100:+.1f}% "
                     f"| {paired} |")
    pairs = summary["capture"]["step_cpu_ratio_to_stock"]["pairs"]
    mean, margin = _mean_and_margin(pairs)
    extra = mean - 1
    lines += ["", f"By this measure, counters ON make a decode step {extra * 100:+.1f}% +/- {margin * 100:.1f}% "
              f"costlier than stock (mean of {len(pairs)} paired rounds): the target is **{_verdict(extra, margin)}** "
              "for the model step. It bounds the throughput lost as long as the worker's step is the bottleneck "
              "(the scheduler, detokenizer and this process run beside it on the other core)."]
    return lines + [""]


def markdown(summary: dict[str, Any], micro: dict[str, Any], config: dict[str, Any], startups: dict[str, list[float]],
             estimate: dict[str, Any], sampling_note: str) -> str:
    mode = "eager" if config["eager"] else "torch.compile (default mode)"
    testbed = Path(config["model"]).parts[-2:] == TESTBED_MODEL.parts[-2:]  # also in another checkout
    model = "the testbed" if testbed else f"`{Path(config['model']).name}`"
    dims = micro.get("dims", {"hidden": 128, "experts": 16, "top_k": 2, "layers": 4})
    lines = [
        f"Tracing overhead on {model} ({mode}, float32): {config['prompts']} prompts x {config['max_tokens']} "
        f"generated tokens per round, greedy, ignore_eos; {config['reps']} repetitions, each starting one engine "
        f"per variant and keeping them all alive while they take turns (A B, B A, ...) for {config['rounds']} timed "
        "rounds per setting. Ratio: round i of the setting / round i of stock in the same repetition (neighbours "
        "in time); mean and min..max over all pairs.",
        "",
        "| setting | output tok/s (median, min..max) | total tok/s (median) | ratio to stock (mean of pairs, min..max) | throughput lost | ratio of pooled medians | ratio of best rounds | output tok per CPU-s (median) | CPU-efficiency ratio | counting in the worker (share of round, median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"stock": "stock vLLM model (no plugin)", "capture": "plugin model, counters ON",
              "capture-off": "plugin model, counters OFF (same engine)", "sampling": "plugin, counters + sampling",
              "sampling-off": "plugin, sampling engine, counters OFF"}
    for name, s in summary.items():
        out = s["output_tok_s"]
        cell = "1 (baseline)"
        lost = ""
        if "ratio_to_stock" in s:
            r = s["ratio_to_stock"]
            mean = statistics.mean(r["pairs"])
            cell = f"{mean:.3f} ({r['min']:.3f}..{r['max']:.3f})"
            lost = f"{(1 - mean) * 100:.1f}%"
        lines.append(f"| {labels.get(name, name)} | {out['median']:.0f} ({out['min']:.0f}..{out['max']:.0f}) | "
                     f"{s['total_tok_s']['median']:.0f} | {cell} | {lost} | {s['pooled_median_ratio_to_stock']:.3f} | "
                     f"{s.get('best_round_ratio_to_stock', 1.0):.3f} | {s['output_tok_per_cpu_s']['median']:.0f} | "
                     f"{s['cpu_ratio_to_stock']:.3f} | "
                     + (f"{s['count_share']['median']:.2%} ({s['count_ms_per_round']['median']:.1f} ms) |"
                        if "count_share" in s else "|"))
    cap = summary["capture"]
    pairs = cap["ratio_to_stock"]["pairs"]
    mean, margin = _mean_and_margin(pairs)
    lost_on = 1 - mean
    lost_cpu = 1 - cap["cpu_ratio_to_stock"]
    verdict = _verdict(lost_on, margin)
    lines += ["", f"Target (at most {TARGET_LOSS:.0%} lost with counters on): **{verdict}**: "
              f"{lost_on * 100:.1f}% +/- {margin * 100:.1f}% (two standard errors over {len(pairs)} pairs of rounds) "
              f"lost by wall-clock throughput (mean of paired ratios, spread "
              f"{(1 - cap['ratio_to_stock']['max']) * 100:.1f}..{(1 - cap['ratio_to_stock']['min']) * 100:.1f}%), "
              f"{(1 - cap['pooled_median_ratio_to_stock']) * 100:.1f}% by pooled medians, {lost_cpu * 100:.1f}% by "
              "CPU cost (output tokens per CPU-second of all engine processes, which other work on the shared "
              f"cores disturbs less than wall time), {(1 - cap['best_round_ratio_to_stock']) * 100:.1f}% by best "
              "rounds.", ""]
    if "step_cpu_ratio_to_stock" in cap:
        lines += _worker_lines(summary, labels)
    if "count_share" in cap:
        lines += [f"Inside the engine, the eager half of capture (`count`: the counting passes, "
                  f"each over the steps that waited) took {cap['count_ms_per_round']['median']:.1f} ms of a round "
                  f"({cap['count_share']['median']:.2%} of its wall time; median over "
                  f"{cap['count_share']['n']} rounds with counters on, timed with perf_counter in the worker). "
                  "The other half, `record` (the probability sums and the scratch writes), is fused by inductor "
                  "into the model's own kernels and runs with counters off too, so the OFF row bounds it.", ""]
    if sampling_note:
        lines += [sampling_note, ""]
    lines += ["Engine start-up (s): " + "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in vals)}"
                                                  for k, vals in startups.items()), ""]
    lines += [
        f"Where the time goes. (1) Capture's two parts for one forward pass, timed alone on one CPU thread "
        f"(hidden {dims['hidden']}, {dims['experts']} experts, top-{dims['top_k']}, {dims['layers']} MoE layers): "
        "`record` (per MoE layer, inside the compiled graph, from the routing the model computed: the "
        "full softmax summed over the step's tokens, and the gates, expert ids and their probabilities written "
        "into the scratch buffer) and `count` "
        "(once per step, eager: once more than "
        f"{micro['count_batch_tokens']} tokens wait counts them for all layers at once; the cost "
        "shown is the mean per step, counting passes included); `router` is the routing the model "
        "computes per layer anyway (logits, softmax, top-k), for scale.",
        "",
        "| tokens per forward | record, eager (us per layer) | count, eager (mean us per step) | count with sampling (mean us per step) | router, eager (us per layer) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in micro["rows"]:
        sampled = "-" if row["sampling_count_us_per_step"] is None else f"{row['sampling_count_us_per_step']:.0f}"
        lines.append(f"| {row['tokens']} | {row['record_us_per_layer']:.0f} | {row['count_us_per_step']:.0f} | "
                     f"{sampled} | {row['router_us_per_layer']:.0f} |")
    comp = micro.get("compiled") or {}
    if "record_us_per_layer" in comp:
        lines += ["", f"torch.compile'd (inductor, as vLLM compiles the model), {comp['tokens']} tokens: the router "
                  f"{comp['router_us_per_layer']:.0f} us per layer, record adds {comp['record_us_per_layer']:.0f} us "
                  "per layer (the difference of the router compiled with and without it)."]
    elif comp:
        lines += ["", f"torch.compile'd micro-benchmark failed: {comp['error']}"]
    lines += ["", f"Profile of `count` at {micro['profile_tokens']} tokens: {micro['aten_ops_per_step']:.0f} profiler "
              f"events and {micro['profile_self_us_per_step']:.0f} us of self CPU time per step (mean of 50 steps, "
              "counting passes included; profiler overhead included):", "",
              "| op | calls per step | self us per step | share |", "|---|---:|---:|---:|"]
    for e in micro["profile_top"]:
        lines.append(f"| {e['op']} | {e['calls_per_step']:.1f} | {e['self_us_per_step']:.1f} | {e['share']:.0%} |")
    lines += ["", estimate["text"], ""]
    prof = estimate.get("profile") or {}
    if prof.get("stock", {}).get("rows") and prof.get("capture", {}).get("rows"):
        st, ca = prof["stock"], prof["capture"]
        names = sorted(set(st["rows"]) | set(ca["rows"]),
                       key=lambda n: -max(st["rows"].get(n, {}).get("self_us", 0), ca["rows"].get(n, {}).get("self_us", 0)))
        names = [n for n in names if n.startswith("moe_prune::")] + [n for n in names if not n.startswith("moe_prune::")]
        lines += [
            f"(2) In the engine: one more stock and one more capture engine, one round ({config['max_tokens']} "
            "tokens x all prompts) under vLLM's torch profiler (the profiler inflates small ops). Worker CPU time: "
            f"stock {st['worker_cpu_us'] / 1e3:.0f} ms, capture {ca['worker_cpu_us'] / 1e3:.0f} ms "
            f"({ca['worker_cpu_us'] / st['worker_cpu_us'] - 1:+.1%}). Entries by self time (ms), plugin ops first:", "",
            "| entry | stock self ms | capture self ms | capture calls |", "|---|---:|---:|---:|",
        ]
        for n in names[:16]:
            a, b = st["rows"].get(n), ca["rows"].get(n)
            lines.append(f"| {n} | {a['self_us'] / 1e3:.1f} | " if a else f"| {n} | - | ")
            lines[-1] += f"{b['self_us'] / 1e3:.1f} | {b['calls']} |" if b else "- | - |"
        lines.append("")
    elif prof:
        lines += [f"In-engine profile: {prof}"[:400], ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The count timer is a function sent to the workers (collective_rpc), which vLLM only
    # serialises with pickle when allowed; the engines here are local to this process.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if args.render_only:
        data = json.loads((args.output / f"{args.results_name}.json").read_text())
        startups: dict[str, list[float]] = {}
        for e in data["engines"]:
            startups.setdefault(e["variant"], []).append(e["startup_s"])
        table = markdown(data["summary"], data["micro_benchmark"], data["config"], startups, data["estimate"],
                         data["sampling_note"]) + f"Run time: {data['elapsed_s'] / 60:.1f} min.\n"
        print(table)
        if not args.no_write:
            write_text_atomic(args.output / f"{args.results_name}.md", table)
        return 0
    per_domain = -(-args.prompts // len(DOMAINS))
    traffic = traffic_ids(args.model, DOMAINS, per_domain)
    prompts = [p for i in range(per_domain) for d in DOMAINS for p in traffic[d][i:i + 1]][: args.prompts]
    variants = ["stock", "capture"]
    sampling_note = ""
    can_sample = sampling_supported()
    if "capture" not in args.variants:
        print("--variants must include capture (the ratio this benchmark is about)", file=sys.stderr)
        return 2
    if "sampling" not in args.variants:
        sampling_note = ("Counters + per-token sampling engine not run (--variants); the micro-benchmark below "
                         "still measures sampling.") if can_sample else ""
    elif can_sample and args.sample_capacity:
        variants.append("sampling")
        sampling_note = (f"Sampling variant: sample ring of {args.sample_capacity} rows, rate {args.sample_rate} "
                         "of traced tokens.")
    elif not can_sample:
        sampling_note = ("Counters + per-token sampling not measured: this tree's plugin has no sampling "
                         "(TracingLLM takes no sample_capacity).")
    began = time.perf_counter()
    engines = []
    for rep in range(args.reps):
        live: list[BenchEngine] = []
        try:
            for variant in variants if rep % 2 == 0 else list(reversed(variants)):
                print(f"[rep {rep + 1}/{args.reps}] {variant}: starting engine", flush=True)
                live.append(BenchEngine(variant, args, prompts))
            for i in range(args.rounds):  # A B, B A, ...: each round's neighbours in time are the other variants
                for bench in live if i % 2 == 0 else list(reversed(live)):
                    bench.run_round()
        finally:
            for bench in live:
                bench.close()
        for bench in live:
            engines.append(bench.result(rep))
            for name, rounds in bench.rounds.items():
                print(f"    {name:14s} output tok/s: " + ", ".join(f"{r['output_tok_s']:.0f}" for r in rounds), flush=True)
    summary = summarise(engines)
    if not args.no_write:  # keep the engine measurements even if a later step fails
        write_text_atomic(args.output / f"{args.results_name}.partial.json",
                          json.dumps({"summary": summary, "engines": engines}, indent=2) + "\n")
    print("micro-benchmark of RoutingRecorder.record and .count", flush=True)
    from vllm_moe_prune.checkpoint import Checkpoint

    ckpt = Checkpoint.open(args.model)
    shape = ckpt.shape
    micro = micro_benchmark(args.micro_tokens, ckpt.config["hidden_size"], shape.num_experts, shape.top_k,
                            len(shape.moe_layers), args.sample_capacity if can_sample else 0, args.sample_rate)
    steps = args.max_tokens  # about one prefill step + max_tokens - 1 decode steps per round
    stock_s = statistics.median([r["seconds"] for e in engines for r in e["rounds"].get("stock", [])])
    capture_s = statistics.median([r["seconds"] for e in engines for r in e["rounds"].get("capture", [])])
    decode_tokens = len(prompts)
    nearest = min(micro["rows"], key=lambda r: abs(r["tokens"] - decode_tokens))
    comp = micro.get("compiled") or {}
    per_layer_us = comp.get("record_us_per_layer", nearest["record_us_per_layer"])
    basis = "compiled" if "record_us_per_layer" in comp else "eager"
    per_step_us = len(shape.moe_layers) * per_layer_us + nearest["count_us_per_step"]
    predicted_s = steps * per_step_us * 1e-6
    estimate = {
        "stock_round_s": stock_s, "capture_round_s": capture_s, "measured_extra_s": capture_s - stock_s,
        "forward_steps": steps, "record_us_per_layer": per_layer_us, "basis": basis,
        "count_us_per_step": nearest["count_us_per_step"],
        "predicted_extra_s": predicted_s, "step_ms_stock": stock_s / steps * 1e3,
    }
    estimate["text"] = (
        f"Estimate: a round is about {steps} forward steps of {len(prompts)} sequences, "
        f"{stock_s / steps * 1e3:.2f} ms each on the stock model (median round). Capture costs ~{per_step_us:.0f} us "
        f"per step ({len(shape.moe_layers)} x {per_layer_us:.0f} us of record, {basis}, plus "
        f"{nearest['count_us_per_step']:.0f} us of count at {nearest['tokens']} tokens), so {steps} steps predict "
        f"{predicted_s * 1e3:.0f} ms more per round ({predicted_s / stock_s:.1%} of a stock round); measured: "
        f"{(capture_s - stock_s) * 1e3:.0f} ms ({(capture_s - stock_s) / stock_s:.1%}, median rounds over all "
        "repetitions). Counters OFF skips `count` and keeps `record`. Capture's work per token is a softmax "
        "over every expert, a copy of its routing and, when counted, a few index additions per MoE layer, the "
        "model's is its attention and active experts: the narrower the experts (the testbed: hidden 128, width "
        "128), the larger capture's share."
    )
    if not args.no_profile:
        estimate["profile"] = {}
        for variant in ("stock", "capture"):
            print(f"in-engine profile: {variant}", flush=True)
            try:
                estimate["profile"][variant] = profile_in_engine(variant, args, prompts,
                                                                 Path("runs") / f"tracing-profile-{variant}")
            except Exception as exc:  # noqa: BLE001 - report, do not lose the other results
                estimate["profile"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    elapsed = time.perf_counter() - began
    startups: dict[str, list[float]] = {}
    for e in engines:
        startups.setdefault(e["variant"], []).append(e["startup_s"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("output", "no_write")}
    table = markdown(summary, micro, config, startups, estimate, sampling_note)
    table += f"Run time: {elapsed / 60:.1f} min.\n"
    print()
    print(table)
    if not args.no_write:
        write_results(args.results_name, {
            "benchmark": "tracing_overhead", "config": config, "environment": environment(),
            "summary": summary, "engines": engines, "micro_benchmark": micro, "estimate": estimate,
            "sampling_note": sampling_note, "elapsed_s": round(elapsed, 1),
        }, table, args.output)
        (args.output / f"{args.results_name}.partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
