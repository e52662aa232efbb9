#!/usr/bin/env bash
# Set up, then run the flagship tutorial (digits BNN: MAP / AutoNormal / low-rank / AutoViking).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${PYRO_VIKING_VENV:-.venv}/bin/activate"
MPLBACKEND=Agg python tutorials/flagship_digits.py
