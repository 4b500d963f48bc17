#!/usr/bin/env bash
# The main command: sets up .venv on a fresh machine, then runs a workflow headlessly.
#   bash scripts/run.sh workflows/text_to_image.json --models /path/to/ComfyUI/models --out output/cascade.png
# Every argument goes to headless.py (`bash scripts/run.sh --help`); relative paths are taken from the
# current folder. With no weights in the models folder the run uses tiny random networks and says so:
# the image is noise until the weights are in place.
# With a ComfyUI checkout (--comfyui PATH, or COMFYUI_PATH) ComfyUI's own Python runs it, as ComfyUI's nodes need
# its dependencies: SCW_COMFYUI_PYTHON, else a venv/ or .venv/ in (or venv/ beside) the checkout, else the embedded
# Windows build's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
COMFY="${COMFYUI_PATH:-}"
[ "${SCW_NO_COMFY:-}" = "1" ] && COMFY=""
prev=""
for arg in "$@"; do
  [ "$prev" = "--comfyui" ] && COMFY="$arg"
  case "$arg" in --comfyui=*) COMFY="${arg#--comfyui=}" ;; esac
  prev="$arg"
done
if [ -n "$COMFY" ]; then
  for python in "${SCW_COMFYUI_PYTHON:-}" "$COMFY/venv/bin/python" "$COMFY/.venv/bin/python" \
                "$COMFY/../venv/bin/python" "$COMFY/../python_embeded/python.exe"; do
    if [ -n "$python" ] && [ -x "$python" ]; then
      exec "$python" "$ROOT/headless.py" "$@"
    fi
  done
  echo "scripts/run.sh: no Python of the ComfyUI at $COMFY found (venv/, .venv/); trying the pack's .venv - set" \
       "SCW_COMFYUI_PYTHON to the Python that runs ComfyUI's main.py" >&2
fi
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/headless.py" "$@"
