"""One module per ``vllm-moe-prune`` subcommand (see vllm_moe_prune.cli)."""
