"""Smoke runs of the tutorials: each script runs end to end with ``SMOKE_TEST=1`` (tiny budgets)
as a subprocess, exits with status 0, prints its summary line and writes its figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TUTORIALS = {
    "sinusoid": ["sinusoid_posterior.png"],
    "two_moons": ["two_moons_posterior.png"],
    "any_pyro_model": ["any_pyro_model_diabetes.png"],
    "vae": ["vae_max_pixel_std.png"],
    "transformer": ["transformer_reliability.png"],
}


@pytest.mark.dtype_independent  # a subprocess: runs in the user's default dtype either way
@pytest.mark.parametrize("name", sorted(TUTORIALS))
def test_tutorial_smoke(name, tmp_path):
    for module in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(module)
    env = {**os.environ, "SMOKE_TEST": "1", "MPLBACKEND": "Agg",
           "PYRO_VIKING_FIGURES": str(tmp_path / "figures"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tutorials" / f"{name}.py")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"SUMMARY {name}" in proc.stdout, proc.stdout[-3000:]
    for png in TUTORIALS[name]:
        path = tmp_path / "figures" / png
        assert path.is_file() and path.stat().st_size > 0, f"{png} not written"
