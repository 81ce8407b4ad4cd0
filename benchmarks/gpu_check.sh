#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU host that has torch (and transformers) but no internet.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py arguments]      # e.g. --out /tmp/gpu_check.json
#
# Installs, with no index and no network, the wheels in $GPU_WHEELS (default .gpu-wheels, made here by
# benchmarks/gpu_wheels.sh and carried along) whose package is missing or at another version, into
# $GPU_SITE (default /tmp/gpu-check-site), which goes first on PYTHONPATH together with the repository
# (nothing is installed into the host's environment, no `pip install -e`). Then runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=${GPU_SITE:-/tmp/gpu-check-site}
if [ -d "$WHEELS" ]; then
  mapfile -t NEED < <(PYTHONPATH="$SITE" "$PY" - "$WHEELS" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, ver = whl.name.split("-")[:2]  # wheel names: {dist}-{version}-..., dist with underscores
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != ver:
        print(whl)
PYEOF
)
  if [ ${#NEED[@]} -gt 0 ]; then
    echo "gpu_check.sh: installing ${#NEED[@]} carried wheel(s) into $SITE: ${NEED[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${NEED[@]}"
  fi
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
