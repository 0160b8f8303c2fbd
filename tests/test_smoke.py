"""Smoke test of the testbed on stock vLLM: offline LLM and the HTTP server vs transformers."""

from __future__ import annotations

import pytest
import requests
import torch
from transformers import AutoTokenizer

from reference import load_float32
from vllm_engine import ENGINE_KWARGS, ApiServer, domain_prompts

pytestmark = pytest.mark.engine

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def expected(testbed):
    """Prompts (one per domain) and transformers' greedy continuations."""
    tokenizer = AutoTokenizer.from_pretrained(testbed)
    prompts = domain_prompts(testbed, tokenizer, per_domain=1, max_tokens=40)
    model = load_float32(testbed)
    outs = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            outs.append(gen[0, len(ids):].tolist())
    return prompts, outs


def test_offline_llm_greedy_matches_transformers(testbed, expected):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, want = expected
    llm = LLM(model=str(testbed), **ENGINE_KWARGS)
    try:
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_http_server_greedy_matches_transformers(testbed, expected, tmp_path):
    prompts, want = expected
    server = ApiServer(["--model", str(testbed), "--dtype", "float32", "--max-model-len", "512"],
                       log_path=tmp_path / "server.log")
    try:
        server.wait_healthy()
        for ids, tokens in zip(prompts, want):
            reply = requests.post(
                f"{server.url}/v1/completions",
                json={"model": str(testbed), "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0,
                      "ignore_eos": True, "return_token_ids": True},
                timeout=120,
            )
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert choice["token_ids"] == tokens
    finally:
        server.kill()
