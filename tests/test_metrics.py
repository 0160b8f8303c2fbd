"""The plugin's series on a real vLLM server's ``/metrics``, checked against ground truth.

Ground truth never comes from the metrics path itself: weight bytes from the checkpoint's
safetensors headers and the plan, kept experts from the plan, traced tokens from the
requests sent, coverage and per-expert counts from the trace shards the server flushed
(the drain path, while metrics read the non-resetting peek), latency counts from the
number of requests. The same pruned variant is served with one API server and with two
(``--api-server-count 2``: ``PROMETHEUS_MULTIPROC_DIR`` mode), one server at a time.
The deploy/ files (dashboard, Prometheus, docker compose) are validated here too.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vllm_engine import SINGLE_API_SERVER, VLLM_SERVE, ApiServer
from vllm_moe_prune.checkpoint import Checkpoint
from vllm_moe_prune.commands.serve_args import server_flags
from vllm_moe_prune.plan import Plan
from vllm_moe_prune.serving import SERVER_ENV, engine_args
from vllm_moe_prune.traces import load_traces
from vllm_moe_prune_plugins.settings import MetricsSettings, SettingsError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "moe-prune-dashboard.json"
MAX_TOKENS = 5
#: Kept experts per MoE layer of the served variant: different in every layer.
KEPT_COUNTS = [12, 6, 9, 3]

#: Server modes: one in-process API server (per-expert series on), and two API servers
#: through ``vllm serve`` (per-expert series left at their default, off).
MODES = {
    "single-process": {"entry": SINGLE_API_SERVER, "flags": [], "per_expert": True, "api_servers": 1},
    "multi-process": {"entry": VLLM_SERVE, "flags": ["--api-server-count", "2", "--enable-log-requests"],
                      "per_expert": False, "api_servers": 2},
}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    """Every sample on ``/metrics``, by sample name (``..._total``, ``..._count`` and so on)."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for got, v in samples.get(name, []) if labels.items() <= got.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {samples.get(name)}"
    return found[0]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.time() + timeout
    while not (result := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return result


def complete(url: str, prompts: list[list[int]]) -> int:
    """Send all prompts at once; return the tokens the model processed (prompt + generated - 1)."""
    model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    def one(ids: list[int]) -> int:
        reply = requests.post(f"{url}/v1/completions", timeout=300, json={
            "model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        return len(ids) + MAX_TOKENS - 1

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, prompts))


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 2000) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def plan_file(testbed, tmp_path_factory) -> Path:
    ckpt = Checkpoint.open(testbed)
    rng = random.Random(0)
    kept = {layer: rng.sample(range(ckpt.shape.num_experts), n) for layer, n in zip(ckpt.shape.moe_layers, KEPT_COUNTS)}
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    Plan.for_checkpoint(ckpt, kept, "test", params={"budget": "30/64 experts"}).save(path)
    return path


@pytest.fixture(scope="module", params=sorted(MODES))
def server(request, testbed, plan_file, tmp_path_factory):
    mode = MODES[request.param]
    trace_dir = tmp_path_factory.mktemp(f"traces-{request.param}")
    args = engine_args(testbed, plan_file)
    env = {
        **SERVER_ENV,
        "MOE_PRUNE_TRACE_DIR": str(trace_dir),
        "MOE_PRUNE_TRACE_ON_BOOT": "1",
        "MOE_PRUNE_FLUSH_INTERVAL": "3600",  # shards come from the test's dumps only
        "MOE_PRUNE_METRICS_INTERVAL": "0.5",
        "MOE_PRUNE_METRICS_PER_EXPERT": "1" if mode["per_expert"] else "0",
    }
    srv = ApiServer(
        ["--model", args["model"], "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         *mode["flags"], *server_flags(args)],
        env=env, log_path=trace_dir.parent / f"server-{request.param}.log", entry=mode["entry"],
    )
    try:
        srv.wait_healthy()
        # Every API server starts tracing on boot; wait for all of them to be up, so that
        # no late start discards traffic the test has already sent.
        wait_for(lambda: srv.log().count("Application startup complete") >= mode["api_servers"],
                 "every API server to start", timeout=120)
        srv.mode, srv.trace_dir, srv.model = mode, trace_dir, args["model"]
        srv.plan = Plan.load(plan_file)
        yield srv
    finally:
        srv.kill()


def labels_of(server) -> dict[str, str]:
    return {"model_name": server.model, "variant": server.plan.plan_id}


@pytest.mark.engine
def test_weight_memory_variant_and_kept_experts(server, testbed):
    ckpt, plan = Checkpoint.open(testbed), server.plan
    m, labels = scrape(server.url), labels_of(server)
    pruned = sum(ckpt.expert_bytes[i][e] for i, layer in enumerate(ckpt.shape.moe_layers)
                 for e in range(ckpt.shape.num_experts) if e not in plan.kept[layer])
    assert pruned > 0 and plan.predicted["routed_expert_bytes_pruned"] == pruned
    assert value(m, "moe_prune_weight_bytes", **labels) == ckpt.total_bytes - pruned == plan.predicted["weight_bytes"]
    assert value(m, "moe_prune_routed_expert_pruned_bytes", **labels) == pruned
    # float32 checkpoint served in float32: resident bytes are the kept experts' checkpoint bytes.
    assert value(m, "moe_prune_routed_expert_bytes", **labels) == plan.predicted["routed_expert_bytes_kept"]
    for layer, ids in plan.kept.items():
        assert value(m, "moe_prune_kept_experts", **labels, layer=str(layer)) == len(ids)
    assert value(m, "moe_prune_variant_info", **labels, method="test", budget="30/64 experts",
                 fingerprint=ckpt.fingerprint) == 1
    assert value(m, "moe_prune_tracing_active", **labels) == 1
    assert value(m, "moe_prune_eager_fallback", **labels) == 0
    assert value(m, "moe_prune_trace_buffer_bytes", **labels) > 0
    assert not any(name.startswith("vllm:moe") for name in m)


@pytest.mark.engine
def test_traffic_counts_coverage_and_latency(server):
    """Two drains (trace dumps) interleave with the metric refreshes: nothing is counted twice or lost."""
    plan, labels, url = server.plan, labels_of(server), server.url
    before = scrape(url)
    tokens0 = value(before, "moe_prune_tokens_traced_total", **labels)
    first, second = random_prompts(24, seed=11), random_prompts(16, seed=12)
    expected = complete(url, first)
    wait_for(lambda: value(scrape(url), "moe_prune_tokens_traced_total", **labels) == tokens0 + expected,
             "the first batch on /metrics")
    assert requests.post(f"{url}/moe_prune/trace/dump", timeout=60).json()["shard"]
    expected += complete(url, second)
    assert requests.post(f"{url}/moe_prune/trace/dump", timeout=60).json()["shard"]  # drained before or after a refresh
    wait_for(lambda: value(scrape(url), "moe_prune_tokens_traced_total", **labels) == tokens0 + expected,
             "both batches on /metrics")
    after = scrape(url)
    traced = value(after, "moe_prune_tokens_traced_total", **labels)
    traces = wait_for(lambda: (t := load_traces(server.trace_dir)).tokens == traced and t, "every shard on disk")
    stats = traces.stats
    stats.validate()

    coverage = stats.kept_mass(plan.kept)
    for i, layer in enumerate(stats.moe_layers):
        layer_labels = {**labels, "layer": str(layer)}
        mass = value(after, "moe_prune_router_prob_mass_total", **layer_labels)
        kept = value(after, "moe_prune_router_prob_mass_kept_total", **layer_labels)
        assert mass == pytest.approx(float(stats.prob_sum[i].sum()), rel=1e-9)
        assert kept == pytest.approx(float(stats.prob_sum[i, plan.kept[layer]].sum()), rel=1e-9)
        assert value(after, "moe_prune_coverage_ratio", **layer_labels) == pytest.approx(float(coverage[i]), rel=1e-9)
        assert 0 < coverage[i] < 1  # a pruned variant: some of the traffic's mass is on pruned experts

    assert value(after, "moe_prune_trace_shards_written_total", **labels) == len(traces.shards)
    assert value(after, "moe_prune_trace_shards_failed_total", **labels) == 0

    if server.mode["per_expert"]:
        for i, layer in enumerate(stats.moe_layers):
            for expert in range(stats.num_experts):
                expert_labels = {**labels, "layer": str(layer), "expert": str(expert)}
                assert value(after, "moe_prune_expert_routed_tokens_total", **expert_labels) == stats.counts[i, expert]
                assert value(after, "moe_prune_expert_router_prob_mass_total", **expert_labels) == pytest.approx(
                    float(stats.prob_sum[i, expert]), rel=1e-9, abs=1e-12)
    else:
        assert not [name for name in after if name.startswith("moe_prune_expert_")]

    requests_sent = len(first) + len(second)
    if server.mode["api_servers"] > 1:  # the sums over processes were really exercised
        served_by = set(re.findall(r"\((ApiServer_\d+) pid=\d+\) INFO .* Added request", server.log_path.read_text()))
        assert served_by == {f"ApiServer_{i}" for i in range(server.mode["api_servers"])}
    latency = {**labels, "engine": "0"}
    for name, per_request in (("time_to_first_token_seconds", 1), ("e2e_request_latency_seconds", 1),
                              ("inter_token_latency_seconds", MAX_TOKENS - 1)):
        ours = value(after, f"moe_prune_{name}_count", **latency) - value(before, f"moe_prune_{name}_count", **latency)
        theirs = value(after, f"vllm:{name}_count") - value(before, f"vllm:{name}_count")
        assert ours == theirs == requests_sent * per_request, name


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.mark.engine
def test_dashboard_queries_only_series_the_server_exposes(server):
    exposed = set(scrape(server.url))
    names = {name for expr in dashboard_queries() for name in re.findall(r"\b(?:moe_prune_\w+|vllm:\w+)", expr)}
    if not server.mode["per_expert"]:
        names = {name for name in names if not name.startswith("moe_prune_expert_")}
    assert names and names <= exposed, sorted(names - exposed)


def test_dashboard_compares_variants():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert {var["name"] for var in dashboard["templating"]["list"]} >= {"datasource", "model_name", "variant"}
    exprs = dashboard_queries()
    for series in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket"):
        assert any(f"moe_prune_{series}" in e and "histogram_quantile" in e and "variant" in e for e in exprs), series
    for series in ("moe_prune_weight_bytes", "moe_prune_kept_experts", "moe_prune_router_prob_mass_kept_total",
                   "moe_prune_tokens_traced_total", "moe_prune_trace_shards_failed_total"):
        assert any(series in e for e in exprs), series
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and all("moe_prune_expert_routed_tokens_total" in t["expr"] for p in heatmaps for t in p["targets"])
    assert any(p.get("repeat") == "layer" for p in heatmaps)  # one heatmap per layer


def test_prometheus_and_compose_config():
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yaml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    targets = [t for job in jobs.values() for group in job["static_configs"] for t in group["targets"]]
    assert len(targets) == 2 and all(job["metrics_path"] == "/metrics" for job in jobs.values())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"prometheus", "grafana", "vllm-full", "vllm-pruned"} <= set(services)
    for target in targets:
        assert target.split(":")[0] in services, target
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"].endswith(":9090")
    provider = yaml.safe_load((provisioning / "dashboards" / "moe-prune.yaml").read_text())["providers"][0]
    assert provider["options"]["path"]


def test_metrics_settings(monkeypatch):
    monkeypatch.delenv("MOE_PRUNE_METRICS_INTERVAL", raising=False)
    monkeypatch.delenv("MOE_PRUNE_METRICS_PER_EXPERT", raising=False)
    assert MetricsSettings.from_env() == MetricsSettings(refresh_interval=10.0, per_expert=False)
    monkeypatch.setenv("MOE_PRUNE_METRICS_PER_EXPERT", "1")
    assert MetricsSettings.from_env().per_expert
    for bad in ("0", "soon"):
        monkeypatch.setenv("MOE_PRUNE_METRICS_INTERVAL", bad)
        with pytest.raises(SettingsError, match="MOE_PRUNE_METRICS_INTERVAL"):
            MetricsSettings.from_env()
