#!/usr/bin/env bash
# Creates .venv-peers: vlmkv (scripts/setup.sh) beside the peers benchmarks/peers.py runs in the same harness: NVIDIA's
# kvpress, whose pin (transformers < 5.3) picks the newest transformers it allows, inside vlmkv's range, and
# optimum-quanto (transformers' quantized cache, which kvpress composes with). The TurboQuant port needs nothing.
#   bash scripts/setup-peers.sh && .venv-peers/bin/python benchmarks/long_fidelity.py --contexts 1024 --peers kvpress,turboquant
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv-peers}
TRANSFORMERS="kvpress==0.5.5 optimum-quanto>=0.2.7" bash scripts/setup.sh
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress beside transformers', transformers.__version__)"
