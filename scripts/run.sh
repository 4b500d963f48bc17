#!/usr/bin/env bash
# The main command: sets up .venv on a fresh machine, then runs a workflow headlessly.
#   bash scripts/run.sh workflows/text_to_image.json --models /path/to/ComfyUI/models --out output/cascade.png
# Every argument goes to headless.py (`bash scripts/run.sh --help`); relative paths are taken from the
# current folder. With no weights in the models folder the run uses tiny random networks and says so:
# the image is noise until the weights are in place.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/headless.py" "$@"
