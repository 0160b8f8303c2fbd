#!/usr/bin/env bash
# Set up (if needed), then run the whole loop on the built-in testbed model:
# traffic -> traces -> plan -> pruned variant served by vLLM -> figures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec vllm-moe-prune demo "$@"
