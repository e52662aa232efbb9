"""examples/lightning_viking.py --smoke: VIKING trained by Lightning's DDP strategy on two CPU
ranks (a subprocess; Lightning starts the second rank itself). The example checks on rank 0 that
the ranks hold the same parameters after training and drew different noise, and prints the
validation NLL of the posterior predictive. Skipped without pytorch-lightning (the ``lightning``
and ``test`` extras install it)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.dtype_independent

ROOT = Path(__file__).resolve().parents[2]


def test_lightning_ddp_smoke_run_trains_two_ranks_in_sync(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_viking.py"),
                           "--smoke"], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "ranks: 2; the same parameters on every rank: True; " \
           "different noise on every rank: True" in proc.stdout, output[-4000:]
    nll = re.search(r"validation NLL ([0-9.]+|nan|inf)", proc.stdout)
    assert nll is not None, output[-4000:]
    assert math.isfinite(float(nll.group(1))) and float(nll.group(1)) > 0
    assert not list(tmp_path.iterdir())  # no logs or checkpoints left behind
