"""Routing capture in a real OpenAI-compatible vLLM server, controlled over HTTP."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from vllm_engine import ApiServer
from vllm_moe_prune.commands.serve_args import server_flags
from vllm_moe_prune.serving import SERVER_ENV, engine_args
from vllm_moe_prune.traces import load_traces

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MAX_TOKENS = 5


@pytest.fixture(scope="module")
def server(testbed, tmp_path_factory):
    trace_dir = tmp_path_factory.mktemp("traces")
    args = engine_args(testbed)
    env = {**SERVER_ENV, "MOE_PRUNE_TRACE_DIR": str(trace_dir), "MOE_PRUNE_FLUSH_INTERVAL": "3",
           "MOE_PRUNE_TRACE_ON_BOOT": "1", "MOE_PRUNE_TRACE_LABEL": "mixed"}
    srv = ApiServer(["--model", args["model"], "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                     *server_flags(args)], env=env, log_path=trace_dir.parent / "server.log")
    try:
        srv.wait_healthy()
        srv.trace_dir = trace_dir
        yield srv
    finally:
        srv.kill()


def _complete(server: ApiServer, prompts: list[list[int]]) -> int:
    """Send all prompts at once; return the tokens the model processed (prompt + generated - 1)."""
    model = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def one(ids: list[int]) -> int:
        reply = requests.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": model, "prompt": ids, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        return len(ids) + MAX_TOKENS - 1

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(one, prompts))


def _prompts(n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(2, 2000) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def test_bad_requests_are_refused_clearly(server):
    for body in (b"{not json", json.dumps({"label": 5}).encode(), json.dumps({"label": "a b"}).encode(),
                 json.dumps({"colour": "red"}).encode(), b"[1]"):
        reply = requests.post(f"{server.url}/moe_prune/trace/start", data=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"], body
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_concurrent_traffic_is_counted_exactly_and_flushed(server):
    requests.post(f"{server.url}/moe_prune/trace/dump", timeout=60)  # start from a clean window
    before = load_traces(server.trace_dir).tokens if list(server.trace_dir.iterdir()) else 0
    expected = _complete(server, _prompts(48, seed=1))
    shard = requests.post(f"{server.url}/moe_prune/trace/dump", timeout=60).json()["shard"]
    assert shard is not None
    traces = load_traces(server.trace_dir)
    assert traces.tokens - before == expected
    traces.stats.validate()
    assert traces.labels.keys() == {"mixed"}
    status = requests.get(f"{server.url}/moe_prune/trace/status", timeout=30).json()
    assert status["active"] and status["shards_failed"] == 0 and status["tokens_unflushed"] == 0
    assert status["compile_check"]["state"] == "not compiled"  # this server runs eagerly


def test_stop_and_start_with_label(server):
    stopped = requests.post(f"{server.url}/moe_prune/trace/stop", timeout=60).json()
    assert stopped["active"] is False
    before = load_traces(server.trace_dir).tokens
    _complete(server, _prompts(4, seed=2))  # not counted: tracing is off
    assert requests.post(f"{server.url}/moe_prune/trace/start", json={"label": "python"}, timeout=60).status_code == 200
    expected = _complete(server, _prompts(6, seed=3))
    requests.post(f"{server.url}/moe_prune/trace/dump", timeout=60)
    traces = load_traces(server.trace_dir)
    assert traces.tokens - before == expected
    assert traces.labels["python"] == expected


def test_replay_command_traces_a_request_log(server, tmp_path):
    import subprocess
    import sys

    prompts = _prompts(10, seed=6)
    log = tmp_path / "requests.jsonl"
    log.write_text("".join(json.dumps({"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}) + "\n"
                           for p in prompts))
    before = load_traces(server.trace_dir).tokens
    out = subprocess.run([sys.executable, "-m", "vllm_moe_prune.cli", "replay", "--url", server.url, "--requests",
                          str(log), "--label", "replayed"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "replayed 10 of 10 requests" in out.stdout
    traces = load_traces(server.trace_dir)
    assert traces.tokens - before == traces.labels["replayed"] == sum(len(p) + MAX_TOKENS - 1 for p in prompts)


def test_killed_server_loses_at_most_the_last_flush_interval(server):
    """Runs last: it kills the server with SIGKILL after a periodic flush."""
    before = load_traces(server.trace_dir).tokens
    expected = _complete(server, _prompts(12, seed=4))
    deadline = time.time() + 60
    while requests.get(f"{server.url}/moe_prune/trace/status", timeout=30).json()["tokens_unflushed"]:
        assert time.time() < deadline, "no periodic flush within 60 s"
        time.sleep(0.5)
    _complete(server, _prompts(12, seed=5))  # never flushed: lost with the kill
    server.kill(signal.SIGKILL)
    traces = load_traces(server.trace_dir)  # every file on disk is a complete, valid shard
    assert traces.tokens - before == expected
