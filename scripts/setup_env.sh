#!/usr/bin/env bash
# Creates .venv with what the pack needs, printing each step. Idempotent: a second run checks and returns.
#   bash scripts/setup_env.sh         what the main command needs (requirements.txt)
#   bash scripts/setup_env.sh --dev   also the test and benchmark packages (requirements-dev.txt: pytest, diffusers,
#                                     peft, opencv), as scripts/test.sh does
# torch is installed first and pinned: `torch==2.13.0` resolves to a local CPU wheel on these machines, while an
# unpinned torch (asked for directly or by a dependency) would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
say() { echo "[setup] $*" >&2; }
# pip's own lines, reduced to what shows progress (one line a package) so a first run is never silent.
pip_progress() { grep --line-buffered -E '^(Collecting|Downloading|Installing collected|Successfully installed)' >&2 || true; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1) ..."
  "$PY" -m venv .venv
fi
stamp=.venv/.scw-installed
want="$(cat requirements.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "1/3 upgrading pip ..."
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  say "2/3 installing torch ${TORCH_VERSION:-2.13.0} (the largest download; a few minutes on a slow line) ..."
  .venv/bin/python -m pip install "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | pip_progress
  # The constraint keeps pip from replacing the CPU torch while resolving the rest.
  .venv/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > .venv/torch-constraint.txt
  say "3/3 installing the pack's runtime packages (requirements.txt) ..."
  .venv/bin/python -m pip install -c .venv/torch-constraint.txt -r requirements.txt 2>&1 | pip_progress
  .venv/bin/python -c "import torch, safetensors, transformers, numpy, PIL, gguf" \
    || { say "the runtime packages do not import; see the pip output above"; exit 1; }
  echo "$want" > "$stamp"
  say "done: .venv holds what the main command needs"
fi
if [ "$DEV" = 1 ]; then
  dev_stamp=.venv/.scw-dev-installed
  dev_want="$(cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)"
  if [ ! -f "$dev_stamp" ] || [ "$(cat "$dev_stamp")" != "$dev_want" ]; then
    say "installing the test and benchmark packages (requirements-dev.txt) ..."
    .venv/bin/python -m pip install -c .venv/torch-constraint.txt -r requirements-dev.txt 2>&1 | pip_progress
    .venv/bin/python -c "import pytest" || { say "pytest does not import; see the pip output above"; exit 1; }
    echo "$dev_want" > "$dev_stamp"
    say "done: .venv also holds the test packages"
  fi
fi
