#!/usr/bin/env bash
# The README's test command: set up .venv and run the test suite on the CPU (GPU tests skip without CUDA):
# the fast set, then the heavy end-to-end cases (`-m slow`). Arguments go to pytest instead (one run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q
python -m pytest -q -m slow
