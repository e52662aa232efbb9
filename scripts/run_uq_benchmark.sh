#!/usr/bin/env bash
# Set up (the package, then the benchmark's optional packages), then run the uncertainty
# benchmark: 7 methods x 5 offline tasks x 3 seeds (about 45 min of one idle core, most of it MNIST-1D). Extra
# arguments go to benchmarks/uq/run.py (e.g. --quick, --tasks digits, --ablations).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${PYRO_VIKING_VENV:-.venv}/bin/activate"
bash benchmarks/uq/setup.sh
MPLBACKEND=Agg python benchmarks/uq/run.py "$@"
