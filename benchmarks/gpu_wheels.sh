#!/usr/bin/env bash
# Prepare, HERE (with PyPI), the wheels that benchmarks/gpu_check.sh installs on a GPU host that
# has torch but no internet. The names are in benchmarks/gpu_wheels.txt; the versions are the ones
# this checkout's .venv has (what the tests run with). Binary wheels are downloaded for the host's
# Python (default 3.12, the lent H200 machine's) on manylinux x86-64; DeepSpeed publishes only a
# source archive, so its wheel is built here with no ops compiled (py3-none-any; ops JIT-compile
# where they are used, and ZeRO-2 with torch's AdamW uses none).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION] [DIR]     # defaults: 3.12 .gpu-wheels
#
# DIR is git-ignored; carry it with the working tree (about 14 MiB; the device tool allows 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
DIR=${2:-.gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
mapfile -t SPECS < <("$PY" - <<'PYEOF'
from importlib.metadata import version
for line in open("benchmarks/gpu_wheels.txt"):
    name = line.split("#", 1)[0].strip()
    if name:
        print(f"{name}=={version(name)}")
PYEOF
)
rm -rf "$DIR" && mkdir -p "$DIR"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for spec in "${SPECS[@]}"; do
  if [[ $spec == deepspeed==* ]]; then
    "$PY" -m pip wheel -q --no-deps --no-build-isolation "$spec" -w "$DIR"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      "${PLATFORMS[@]}" "$spec" -d "$DIR"
  fi
done
ls -1 "$DIR"
echo "gpu_wheels: ${#SPECS[@]} wheels for Python $PYV in $DIR, $(du -sh "$DIR" | cut -f1) in all"
