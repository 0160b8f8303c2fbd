"""``vllm-moe-prune replay``: replay a request log against a running server that traces."""

from __future__ import annotations

import argparse
import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from vllm_moe_prune.errors import UserError
from vllm_moe_prune.prompts import PromptError, read_jsonl_objects

logger = logging.getLogger(__name__)

HELP = """\
Send every request of a log (JSONL, one OpenAI request body per line: "prompt" for
/v1/completions, "messages" for /v1/chat/completions) to a running vLLM server started
with this plugin's flags (`vllm-moe-prune serve-args`), with routing capture on under
--label, then ask the server to flush its trace shard.

  vllm-moe-prune replay --url http://127.0.0.1:8000 --requests requests.jsonl --label chat

The shard lands in the server's MOE_PRUNE_TRACE_DIR.
"""


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read())


def read_requests(path: str) -> list[tuple[str, dict[str, Any]]]:
    """``(endpoint, body)`` of every logged request; refuses lines that are neither shape."""
    out = []
    for _, where, body in read_jsonl_objects(path, "request"):
        if "messages" in body:
            out.append(("/v1/chat/completions", body))
        elif "prompt" in body:
            out.append(("/v1/completions", body))
        else:
            raise PromptError(f"{where}: a request needs 'prompt' (completions) or 'messages' (chat), got {sorted(body)}")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "replay", help="replay a request log against a running traced server", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="base URL of the vLLM server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", required=True, help="JSONL request log")
    parser.add_argument("--label", default="replay", help="traffic label of the trace shard (default: replay)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    requests = read_requests(args.requests)
    base = args.url.rstrip("/")
    try:
        model = _request(f"{base}/v1/models", timeout=30)["data"][0]["id"]
        _request(f"{base}/moe_prune/trace/start", {"label": args.label}, timeout=60)
    except urllib.error.HTTPError as exc:
        raise UserError(f"{base} refused trace control ({exc.code}): is it started with `vllm-moe-prune serve-args` "
                        "flags and VLLM_PLUGINS?") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot reach the server at {base}: {exc}") from None

    def send(item: tuple[str, dict[str, Any]]) -> bool:
        endpoint, body = item
        try:
            _request(base + endpoint, {"model": model, **body})
            return True
        except (urllib.error.URLError, OSError) as exc:
            logger.warning("request to %s failed: %s", endpoint, exc)
            return False

    with ThreadPoolExecutor(args.concurrency) as pool:
        ok = sum(tqdm(pool.map(send, requests), total=len(requests), desc="replay"))
    shard = _request(f"{base}/moe_prune/trace/dump", {}, timeout=120).get("shard")
    print(f"replayed {ok} of {len(requests)} requests (label {args.label}); trace shard: {shard}")
    return 0 if ok == len(requests) else 1
