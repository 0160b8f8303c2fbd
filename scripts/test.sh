#!/usr/bin/env bash
# Set up (if needed), then run the whole test suite (real vLLM engines included).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec python -m pytest "$@"
