#!/usr/bin/env bash
# Creates .venv with everything the pack, its tests and its benchmarks need. Idempotent.
# torch is installed first and pinned: `torch==2.13.0` resolves to a local CPU wheel on these machines,
# while an unpinned torch (asked for directly or by a dependency) would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.scw-installed
want="$(cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  # The constraint keeps pip from replacing the CPU torch while resolving the rest.
  .venv/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > .venv/torch-constraint.txt
  .venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
