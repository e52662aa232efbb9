#!/usr/bin/env bash
# Create (or reuse) a virtual environment in .venv with pyro_viking and its extras.
# torch is pinned here (a CPU build served locally); the package itself only needs torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PYRO_VIKING_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[tutorials,test]"
