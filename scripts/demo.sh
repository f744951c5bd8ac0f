#!/usr/bin/env bash
# The README's main job: set up .venv and run `vlmkv demo` on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vlmkv demo "$@"
