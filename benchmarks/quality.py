"""Held-out perplexity per domain of every pruning method, served by vLLM, on the testbed.

For one calibration setting per invocation:

  mixed    routing traces and calibration signals from all four domains' traffic
  single   traces and calibration from ONE domain's traffic (--domain, default python);
           the other three domains are unseen by the plan

the script replays the traffic through the full model with capture (trace shards), runs
the calibration pass, plans every method in vllm_moe_prune.methods.METHODS at each
budget (``75%``/``50%`` = share of routed experts KEPT, i.e. 25% / 50% removed), serves
each variant with vLLM from the original checkpoint (``enforce_eager``, float32) and
scores the held-out text of every domain with vLLM prompt logprobs. One plan
(``--crosscheck``, default mosaic@50%) and the full model are also scored with
transformers running the pruned model (tests/reference.py), as an independent check of
what vLLM serves.

Results accumulate per setting in benchmarks/results/quality.json; quality.md is
rebuilt from every setting present, with a comparison to the published claims.

    flock /tmp/vllm-engine.lock python benchmarks/quality.py --setting mixed
    flock /tmp/vllm-engine.lock python benchmarks/quality.py --setting single --domain python
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import ENGINE_KWARGS, RESULTS, environment, heldout_ids, load_jsonl, traffic_ids
from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.errors import UserError
from vllm_moe_prune.methods import METHODS
from vllm_moe_prune.quality import perplexity, ratio_summary
from vllm_moe_prune.testbed import TESTBED_MODEL
from vllm_moe_prune.testbed.corpus import DOMAINS

TESTS = Path(__file__).resolve().parent.parent / "tests"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("mixed", "single"), default="mixed", help="calibration setting")
    parser.add_argument("--domain", choices=DOMAINS, default="python", help="the one domain of --setting single")
    parser.add_argument("--model", type=Path, default=TESTBED_MODEL, help="model directory (default: the testbed)")
    parser.add_argument("--budgets", nargs="+", default=["75%", "50%"], help="shares of routed experts kept")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods (default: all registered)")
    parser.add_argument("--traffic-per-domain", type=int, default=48, help="traffic prompts replayed per domain")
    parser.add_argument("--calibration-tokens", type=int, default=2048, help="tokens of the calibration pass")
    parser.add_argument("--heldout-len", type=int, default=256, help="held-out texts are cut to this many tokens")
    parser.add_argument("--crosscheck", default="mosaic@50%",
                        help="METHOD@BUDGET also scored with transformers (tests/reference.py); 'none' skips")
    parser.add_argument("--workdir", type=Path, help="traces, calibration, plans (default: runs/quality-<setting>-<time>)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for quality.json/.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild quality.md from the existing quality.json; run nothing")
    return parser.parse_args(argv)


def _kept_key(kept: dict[int, list[int]]) -> str:
    return json.dumps({str(k): v for k, v in sorted(kept.items())})


def serve_full(model: Path, traffic: dict[str, list[list[int]]], heldout: dict[str, list[list[int]]],
               trace_dir: Path) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
    """Full model: replay traffic with capture into labelled shards, then held-out logprobs."""
    from vllm_moe_prune_plugins.offline import TracingLLM, prompt_logprobs, trace_labelled

    fingerprint = Checkpoint.open(model).fingerprint
    started = time.perf_counter()
    with TracingLLM(model, None, enforce_eager=True, **ENGINE_KWARGS) as engine:
        startup = time.perf_counter() - started
        traced = {d: st.tokens for d, st in trace_labelled(engine, traffic, 16, trace_dir, fingerprint).items()}
        logprobs = {d: prompt_logprobs(engine.llm, seqs) for d, seqs in heldout.items()}
        status = engine.status()
    row = {"name": "full", "method": "full", "budget": "100%", "plan_id": "full", "startup_s": round(startup, 1),
           "traced_tokens": traced, "expert_bytes_resident": status["expert_bytes_resident"],
           "experts_per_layer": None, "perplexity": {d: perplexity(lp) for d, lp in logprobs.items()}}
    return row, logprobs


def serve_plan(model: Path, plan_path: Path, heldout: dict[str, list[list[int]]]
               ) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
    from vllm_moe_prune_plugins.offline import TracingLLM, prompt_logprobs

    started = time.perf_counter()
    with TracingLLM(model, plan_path, enforce_eager=True, **ENGINE_KWARGS) as engine:
        startup = time.perf_counter() - started
        logprobs = {d: prompt_logprobs(engine.llm, seqs) for d, seqs in heldout.items()}
        status = engine.status()
    return {"startup_s": round(startup, 1), "expert_bytes_resident": status["expert_bytes_resident"],
            "perplexity": {d: perplexity(lp) for d, lp in logprobs.items()}}, logprobs


def transformers_check(model: Path, kept: dict[int, list[int]] | None, heldout: dict[str, list[list[int]]],
                       vllm_logprobs: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Perplexity of the same variant computed by transformers (tests/reference.py), and the largest gap."""
    sys.path.insert(0, str(TESTS))
    from reference import pruned_reference_logprobs
    from vllm_engine import reference_token_logprobs

    seqs = [s for d in DOMAINS for s in heldout[d]]
    full_vocab = pruned_reference_logprobs(model, kept, seqs)
    picked = reference_token_logprobs(full_vocab, seqs)
    out, max_diff, start = {}, 0.0, 0
    for d in DOMAINS:
        ref = picked[start:start + len(heldout[d])]
        start += len(heldout[d])
        out[d] = perplexity(ref)
        for a, b in zip(ref, vllm_logprobs[d]):
            max_diff = max(max_diff, float((a[1:] - b[1:]).abs().max()))
    return {"perplexity_transformers": out, "max_abs_logprob_diff": max_diff}


def run_setting(args: argparse.Namespace) -> dict[str, Any]:
    from vllm_moe_prune.calibration import run_calibration
    from vllm_moe_prune.commands.plan import make_plan

    model = args.model
    seen = list(DOMAINS) if args.setting == "mixed" else [args.domain]
    unseen = [d for d in DOMAINS if d not in seen]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.workdir or Path("runs") / f"quality-{args.setting}-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    traffic = traffic_ids(model, seen, args.traffic_per_domain)
    heldout = heldout_ids(model, args.heldout_len)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    print(f"[1/4] full model: replaying {sum(map(len, traffic.values()))} prompts of {seen} with capture", flush=True)
    full, full_lp = serve_full(model, traffic, heldout, work / "traces")
    timings["full_engine_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[2/4] calibration pass", flush=True)
    prompts_file = work / "calibration-prompts.jsonl"
    write_text_atomic(prompts_file, "".join(
        json.dumps({"prompt": text}) + "\n"
        for d in seen for text in load_jsonl(model / "data" / d / "traffic.jsonl", "prompt", args.traffic_per_domain)))
    run_calibration(model, prompts_file, work / "calibration", max_tokens=args.calibration_tokens, progress=False)
    timings["calibration_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[3/4] plans: {len(args.methods)} methods x budgets {args.budgets}", flush=True)
    (work / "plans").mkdir(exist_ok=True)
    rows, by_kept = [], {}
    for budget in args.budgets:
        for method in args.methods:
            row: dict[str, Any] = {"name": f"{method}@{budget}", "method": method, "budget": budget}
            try:
                p0 = time.perf_counter()
                plan = make_plan(model, method, budget, traces=[str(work / "traces")],
                                 calibration=str(work / "calibration"))
                row["plan_s"] = round(time.perf_counter() - p0, 2)
            except UserError as exc:
                row["error"] = str(exc)
                rows.append(row)
                print(f"    {method}@{budget}: refused: {exc}", flush=True)
                continue
            path = work / "plans" / f"{method}-{budget.rstrip('%')}.yaml"
            plan.save(path)
            row.update(plan_id=plan.plan_id, plan_path=str(path), experts_per_layer=list(plan.experts_per_layer.values()),
                       expert_bytes_kept=plan.predicted["routed_expert_bytes_kept"], kept=plan.kept)
            row["same_kept_as"] = by_kept.setdefault(_kept_key(plan.kept), row["name"])
            rows.append(row)
    timings["planning_s"] = time.perf_counter() - t

    t = time.perf_counter()
    unique = [r for r in rows if "error" not in r and r["same_kept_as"] == r["name"]]
    print(f"[4/4] serving {len(unique)} distinct variants (of {len(rows)} plans)", flush=True)
    want_logprobs = {r["same_kept_as"] for r in rows if r["name"] == args.crosscheck and "error" not in r}
    served: dict[str, dict[str, Any]] = {}
    logprobs: dict[str, dict[str, list[torch.Tensor]]] = {}
    for i, row in enumerate(unique, 1):
        result, lp = serve_plan(model, Path(row["plan_path"]), heldout)
        served[row["name"]] = result
        if row["name"] in want_logprobs:
            logprobs[row["name"]] = lp
        print(f"    ({i}/{len(unique)}) {row['name']}: " + ", ".join(f"{d} {v:.2f}" for d, v in result["perplexity"].items())
              + f"  [start {result['startup_s']} s]", flush=True)
    timings["serving_s"] = time.perf_counter() - t
    for row in rows:
        if "error" in row:
            continue
        result = served[row["same_kept_as"]]
        row.update(perplexity=result["perplexity"], expert_bytes_resident=result["expert_bytes_resident"],
                   startup_s=result["startup_s"])
        row["bytes_match_plan"] = row["expert_bytes_resident"] == row["expert_bytes_kept"]
    for row in [full] + rows:
        if "perplexity" in row:
            row["ratio"] = {d: row["perplexity"][d] / full["perplexity"][d] for d in DOMAINS}
            row["summary"] = ratio_summary(row["perplexity"], full["perplexity"], unseen)
            row["summary"]["worst_ratio"] = max(row["ratio"].values())
            if unseen:
                row["summary"]["geomean_unseen_ratio"] = math.exp(
                    sum(math.log(row["ratio"][d]) for d in unseen) / len(unseen))

    crosscheck: dict[str, Any] = {}
    if args.crosscheck != "none":
        t = time.perf_counter()
        print(f"cross-check with transformers: full and {args.crosscheck}", flush=True)
        crosscheck["full"] = transformers_check(model, None, heldout, full_lp) | {"perplexity_vllm": full["perplexity"]}
        target = next((r for r in rows if r["name"] == args.crosscheck and "error" not in r), None)
        if target is not None and target["same_kept_as"] in logprobs:
            crosscheck[target["name"]] = transformers_check(model, target["kept"], heldout, logprobs[target["same_kept_as"]]) | {
                "perplexity_vllm": target["perplexity"]}
        timings["crosscheck_s"] = time.perf_counter() - t
    for row in rows:
        row.pop("kept", None)
    return {
        "setting": args.setting, "seen_domains": seen, "unseen_domains": unseen, "workdir": str(work),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "distinct_variants_served": len(unique),
        "full": full, "rows": rows, "crosscheck": crosscheck,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("output", "no_write", "workdir")},
    }


# --------------------------------------------------------------------------- report


def _setting_table(key: str, res: dict[str, Any]) -> list[str]:
    unseen = res["unseen_domains"]
    title = ("Mixed calibration (traces + calibration from all four domains' traffic)" if res["setting"] == "mixed"
             else f"Single-domain calibration: traces + calibration from {res['seen_domains'][0]} traffic only; "
                  f"unseen: {', '.join(unseen)}")
    head = ("| method | budget kept | experts per layer | " + " | ".join(f"ppl {d}" for d in DOMAINS)
            + " | geo-mean ratio | worst ratio |" + (" worst unseen ratio |" if unseen else "") + " plan s |")
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    full = res["full"]
    lines.append("| full | 100% | 16,16,16,16 | " + " | ".join(f"{full['perplexity'][d]:.3f}" for d in DOMAINS)
                 + " | 1 | 1 |" + (" 1 |" if unseen else "") + " |")
    for row in res["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['budget']} | refused: {row['error'][:80]} |")
            continue
        s = row["summary"]
        same = "" if row["same_kept_as"] == row["name"] else f" (= {row['same_kept_as']})"
        lines.append(
            f"| {row['method']}{same} | {row['budget']} | {','.join(map(str, row['experts_per_layer']))} | "
            + " | ".join(f"{row['perplexity'][d]:.3f}" for d in DOMAINS)
            + f" | {s['geomean_ratio']:.3f} | {s['worst_ratio']:.3f} |"
            + (f" {s['worst_unseen_ratio']:.3f} |" if unseen else "") + f" {row['plan_s']:.1f} |")
    bad = [r["name"] for r in res["rows"] if "error" not in r and not r["bytes_match_plan"]]
    lines += ["", f"Resident routed-expert bytes equal the plan's kept bytes for every variant: "
                  f"{'yes' if not bad else 'NO: ' + ', '.join(bad)}. {res['distinct_variants_served']} distinct "
                  f"variants served (identical kept sets are served once). Timings (s): "
              + ", ".join(f"{k} {v}" for k, v in res["timings_s"].items()) + f". Run {res['date']}."]
    if res["crosscheck"]:
        lines += ["", "Cross-check, vLLM vs transformers running the pruned model (tests/reference.py):", "",
                  "| variant | " + " | ".join(f"ppl {d} vLLM / transformers" for d in DOMAINS)
                  + " | max abs token logprob diff |", "|---|" + "---|" * (len(DOMAINS) + 1)]
        for name, c in res["crosscheck"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{c['perplexity_vllm'][d]:.4f} / {c['perplexity_transformers'][d]:.4f}" for d in DOMAINS)
                + f" | {c['max_abs_logprob_diff']:.2e} |")
    return lines + [""]


def _find(res: dict[str, Any], method: str, budget: str) -> dict[str, Any] | None:
    return next((r for r in res["rows"] if r["method"] == method and r["budget"] == budget and "error" not in r), None)


def _claims(settings: dict[str, dict[str, Any]]) -> list[str]:
    """Statements computed from the measured numbers, one per published claim."""
    lines = ["## What the testbed reproduces and what it does not", ""]
    single = next((v for k, v in settings.items() if v["setting"] == "single"), None)
    mixed = settings.get("mixed")
    budgets = sorted({r["budget"] for v in settings.values() for r in v["rows"]}, reverse=True)
    cfg = next(iter(settings.values()))["config"]

    if single is not None:
        dom = single["seen_domains"][0]
        parts = []
        for b in budgets:
            vals = {m: _find(single, m, b) for m in ("mosaic", "frequency", "enumeration")}
            if not all(vals.values()):
                continue
            w = {m: r["summary"]["worst_unseen_ratio"] for m, r in vals.items()}
            g = {m: r["summary"]["geomean_unseen_ratio"] for m, r in vals.items()}
            best = w["mosaic"] < min(w["frequency"], w["enumeration"]) and g["mosaic"] < min(g["frequency"], g["enumeration"])
            parts.append(
                f"at {b} kept, worst unseen-domain ratio mosaic {w['mosaic']:.3f} vs frequency {w['frequency']:.3f} vs "
                f"enumeration {w['enumeration']:.3f} (geo-mean over unseen domains {g['mosaic']:.3f} / "
                f"{g['frequency']:.3f} / {g['enumeration']:.3f}): "
                + ("**reproduced**, Mosaic best on both" if best else "**not reproduced**"))
        lines.append(f"* Mosaic > frequency / enumeration on domains the calibration did not see (calibrated on "
                     f"{dom} only): " + "; ".join(parts) + ".")
    if mixed is not None:
        parts = []
        for b in budgets:
            ranked = sorted((r for r in mixed["rows"] if r["budget"] == b and "error" not in r),
                            key=lambda r: r["summary"]["geomean_ratio"])
            names = [r["method"] for r in ranked]
            if "mosaic" in names:
                parts.append(f"at {b} kept it ranks {names.index('mosaic') + 1} of {len(names)} "
                             f"(geo-mean ratio {ranked[names.index('mosaic')]['summary']['geomean_ratio']:.3f}, "
                             f"best {ranked[0]['method']} {ranked[0]['summary']['geomean_ratio']:.3f})")
        if parts:
            lines.append("* The other side of Mosaic: with calibration from every domain (nothing unseen) "
                         + "; ".join(parts) + ".")
    for key, res in settings.items():
        r50 = {m: _find(res, m, "50%") for m in METHODS}
        pf = r50.get("pathfinder")
        uniform = {m: r for m, r in r50.items() if r is not None and METHODS[m].uniform}
        if pf is None or not uniform:
            continue
        best_m = min(uniform, key=lambda m: uniform[m]["summary"]["geomean_ratio"])
        g = pf["summary"]["geomean_ratio"]
        beaten = [m for m, r in uniform.items() if r["summary"]["geomean_ratio"] <= g]
        lines.append(
            f"* Pathfinder (non-uniform: {','.join(map(str, pf['experts_per_layer']))} experts per layer) better at 50% "
            f"({key}): geo-mean ratio {g:.3f} vs best uniform method {best_m} "
            f"{uniform[best_m]['summary']['geomean_ratio']:.3f}; uniform methods at least as good: "
            f"{', '.join(beaten) if beaten else 'none'}: "
            + ("**reproduced**" if not beaten else "**not reproduced**") + ".")
    parts = []
    for key, res in settings.items():
        for b in budgets:
            reap, freq = _find(res, "reap", b), _find(res, "frequency", b)
            if reap and freq:
                a, c = reap["summary"]["geomean_ratio"], freq["summary"]["geomean_ratio"]
                parts.append(f"{key} {b}: {a:.3f} vs {c:.3f} ({'REAP better' if a < c else 'frequency at least as good'})")
    if parts:
        lines.append("* REAP > frequency (geo-mean ratio, REAP vs frequency): " + "; ".join(parts) + ".")
    for key, res in settings.items():
        for b in budgets:
            ranked = sorted((r for r in res["rows"] if r["budget"] == b and "error" not in r),
                            key=lambda r: r["summary"]["geomean_ratio"])
            if ranked:
                lines.append(f"* Ranking by geo-mean ratio, {key} at {b} kept: "
                             + " < ".join(f"{r['method']} {r['summary']['geomean_ratio']:.3f}" for r in ranked) + ".")
    slow = [(k, r) for k, res in settings.items() for r in res["rows"] if r.get("plan_s", 0) > 10]
    if slow:
        lines.append("* Planning cost: " + "; ".join(f"{r['name']} ({k}) {r['plan_s']:.0f} s" for k, r in slow)
                     + " (enumeration searches every subset exhaustively when C(16, r) <= 20000: 12870 subsets per "
                     "layer at 50%); every other plan took under 10 s.")
    lines += [
        "",
        "Scope: the testbed is 4 MoE layers x 16 experts (top-2, hidden 128) trained for 2500 steps on four text "
        "domains; quality is held-out perplexity (vLLM prompt logprobs, float32), not zero-shot task accuracy; one "
        f"seed, {cfg['traffic_per_domain']} traffic prompts per seen domain and a {cfg['calibration_tokens']}-token "
        "calibration pass. The published numbers are "
        "task accuracies of Mixtral-8x7B, Qwen1.5-MoE and Qwen3-30B-A3B (8 to 128 experts per layer, up to 48 "
        "layers), where Pathfinder's path scores span many layers and Mosaic clusters many more experts. "
        "A method ordering measured here is evidence about these implementations on this model, not a "
        "reproduction or refutation of the papers' figures.",
    ]
    if mixed is None or single is None:
        lines.append("")
        lines.append(f"(Only {', '.join(settings)} measured so far; run the other --setting to complete the comparison.)")
    return lines + [""]


def markdown(settings: dict[str, dict[str, Any]]) -> str:
    lines = ["Held-out perplexity per domain of every method, each variant served by vLLM from the original "
             "checkpoint (prompt logprobs, float32, enforce_eager); ratio = pruned / unpruned perplexity; budget = "
             "share of routed experts KEPT (75% = a quarter removed).", ""]
    order = sorted(settings, key=lambda k: (k != "mixed", k))
    for key in order:
        lines += _setting_table(key, settings[key])
    lines += _claims({k: settings[k] for k in order})
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        print(f"unknown methods {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    path = args.output / "quality.json"
    if args.render_only:
        data = json.loads(path.read_text())
        table = markdown(data["settings"])
        print(table)
        if not args.no_write:
            write_text_atomic(args.output / "quality.md", table)
        return 0
    began = time.perf_counter()
    result = run_setting(args)
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    result["environment"] = environment()
    key = "mixed" if args.setting == "mixed" else f"single-{args.domain}"
    data = json.loads(path.read_text()) if path.exists() else {"benchmark": "quality", "settings": {}}
    data["settings"][key] = result
    table = markdown(data["settings"])
    print()
    print("\n".join(_setting_table(key, result)))
    print("\n".join(_claims({k: data["settings"][k] for k in sorted(data["settings"], key=lambda k: (k != "mixed", k))})))
    print(f"Run time: {result['elapsed_s'] / 60:.1f} min; work files in {result['workdir']}")
    if not args.no_write:
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")
        write_text_atomic(args.output / "quality.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
