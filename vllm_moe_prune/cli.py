"""``vllm-moe-prune``: the command line of the project.

Each subcommand lives in its own module under :mod:`vllm_moe_prune.commands` and exposes
``add_parser(subparsers)`` (which registers the subcommand and its ``--help``) and
``run(args) -> int``. Errors that users can fix (bad files, impossible budgets) are
printed as one line and exit with status 2; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vllm_moe_prune.errors import UserError

#: Subcommands in the order of the data flow: traffic -> traces -> plan -> variant.
COMMANDS = ("trace", "replay", "calibrate", "plan", "inspect", "serve-args", "export", "demo")

DESCRIPTION = """\
Turn live vLLM traffic into a smaller Mixture-of-Experts model and serve it.

The loop, one way:
  trace       run prompts through vLLM with routing capture on -> trace shards
  replay      send a request log to a running traced server -> trace shards
  calibrate   a small pass that records expert outputs (methods that need them)
  plan        pick the experts to keep under a memory budget -> plan.yaml
  inspect     what a plan keeps, its bytes, the share of traced routing it covers
  serve-args  the vLLM flags that serve the pruned variant from the original checkpoint
  export      write a standalone pruned Hugging Face checkpoint
  demo        the whole loop on the built-in testbed model, with figures

Run `vllm-moe-prune COMMAND --help` for each command's options.
"""


def _module(command: str):
    return importlib.import_module(f"vllm_moe_prune.commands.{command.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-moe-prune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        try:
            module = _module(command)
        except ModuleNotFoundError as exc:
            if exc.name != f"vllm_moe_prune.commands.{command.replace('-', '_')}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"vllm-moe-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
