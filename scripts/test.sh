#!/usr/bin/env bash
# The test command: sets up .venv with the test packages on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --dev
exec .venv/bin/python -m pytest -q "$@"
