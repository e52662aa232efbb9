#!/usr/bin/env bash
# Set up, then run the linter and the whole test suite (tutorial smoke runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${PYRO_VIKING_VENV:-.venv}/bin/activate"
ruff check .
MPLBACKEND=Agg python -m pytest -q
