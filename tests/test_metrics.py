"""Tests of pyro_viking.metrics on hand-computable cases, and a smoke run of the tutorial."""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_viking.metrics import (
    bayesian_model_average,
    classification_metrics,
    expected_calibration_error,
    ood_auroc,
    ood_scores,
    reliability_diagram,
)

ROOT = Path(__file__).resolve().parents[1]

# Two samples, three inputs, two classes.
PROBS = torch.tensor(
    [
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
        [[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]],
    ]
)
Y = torch.tensor([0, 1, 0])
# BMA: [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]] -> predictions 0, 1, 1 -> 2 of 3 correct.


def test_bma():
    expected = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
    assert torch.allclose(bayesian_model_average(PROBS), expected)


def test_classification_metrics_hand_computed():
    m = classification_metrics(PROBS, Y)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.7) + math.log(0.4)) / 3)
    per_sample = [math.log(p) for p in (0.9, 0.8, 0.6, 0.7, 0.6, 0.2)]
    assert m["expected_nll"] == pytest.approx(-sum(per_sample) / 6)
    assert m["expected_nll"] >= m["nll"]  # Jensen
    # Brier: sum over classes of squared errors, averaged over inputs.
    brier = (2 * 0.2**2 + 2 * 0.3**2 + 2 * 0.6**2) / 3
    assert m["brier"] == pytest.approx(brier)
    # ECE (15 bins): confidences 0.8 (correct), 0.7 (correct), 0.6 (wrong), each alone in a bin.
    assert m["ece"] == pytest.approx((0.2 + 0.3 + 0.6) / 3)


def test_ece_shared_bin_and_perfect_calibration():
    # Four inputs at confidence 0.75 in one bin, three of them correct: perfectly calibrated.
    p = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(p, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    # All four correct: |1 − 0.75| = 0.25.
    assert expected_calibration_error(p, torch.tensor([0, 0, 0, 0])) == pytest.approx(0.25)
    # Two bins: conf 0.95 correct (gap 0.05), conf 0.55 wrong (gap 0.55), weights 1/2 each.
    p = torch.tensor([[0.95, 0.05], [0.45, 0.55]])
    assert expected_calibration_error(p, torch.tensor([0, 0])) == pytest.approx(0.3)


def test_ece_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(5, 200, 4, generator=g), -1)
    y = torch.randint(0, 4, (200,), generator=g)
    pbar = probs.mean(0)
    ref = tm.multiclass_calibration_error(pbar, y, num_classes=4, n_bins=15, norm="l1")
    assert expected_calibration_error(probs, y) == pytest.approx(float(ref), abs=1e-5)


def test_metrics_match_sklearn_on_random_input():
    from sklearn.metrics import accuracy_score

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(7, 50, 3, generator=g), -1)
    y = torch.randint(0, 3, (50,), generator=g)
    m = classification_metrics(probs.numpy(), y.numpy())  # numpy input works too
    pbar = probs.double().mean(0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pbar.argmax(-1)))
    assert m["nll"] == pytest.approx(float(-pbar[torch.arange(50), y].log().mean()))
    onehot = torch.nn.functional.one_hot(y, 3).double()
    assert m["brier"] == pytest.approx(float(((pbar - onehot) ** 2).sum(-1).mean()))


def test_single_prediction_is_one_sample():
    m2 = classification_metrics(PROBS[0], Y)
    m3 = classification_metrics(PROBS[:1], Y)
    assert m2 == pytest.approx(m3)
    assert m2["nll"] == pytest.approx(m2["expected_nll"])
    assert torch.all(ood_scores(PROBS[0])["max_var"] == 0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        classification_metrics(torch.rand(2, 3, 4, 5), torch.zeros(4))
    with pytest.raises(ValueError):
        classification_metrics(PROBS, torch.zeros(4))


def test_ood_scores_hand_computed():
    s = ood_scores(PROBS)
    def h(p):
        return -sum(q * math.log(q) for q in p if q > 0)
    expected_h = [h([0.8, 0.2]), h([0.3, 0.7]), h([0.4, 0.6])]
    assert torch.allclose(s["entropy"], torch.tensor(expected_h, dtype=torch.float64))
    # Population variance across the two samples; both classes have the same variance.
    expected_var = [0.1**2, 0.1**2, 0.2**2]
    assert torch.allclose(s["max_var"], torch.tensor(expected_var, dtype=torch.float64))
    # One-hot BMA has zero entropy (0 log 0 = 0), uniform has log C.
    s = ood_scores(torch.tensor([[[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]]))
    assert torch.allclose(s["entropy"], torch.tensor([0.0, math.log(3)], dtype=torch.float64))


def test_ood_auroc():
    assert ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == pytest.approx(1.0)
    assert ood_auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == pytest.approx(0.0)
    # Pairs (in, out): out > in for 3 of 4 pairs -> 0.75; ties count one half.
    assert ood_auroc([0.1, 0.3], [0.2, 0.4]) == pytest.approx(0.75)
    assert ood_auroc([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.5)


def test_reliability_diagram_draws(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    out = reliability_diagram(ax, PROBS, Y, title="toy")
    assert out is ax
    assert ax.get_title().startswith("toy (ECE = ")
    assert ax.get_xlabel() and ax.get_ylabel()
    assert len(ax.patches) == 3  # one bar per non-empty bin
    fig.savefig(tmp_path / "r.png")
    plt.close(fig)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_module_does_not_import_sklearn_eagerly():
    code = ("import sys; import pyro_viking.metrics; "
            "assert 'sklearn' not in sys.modules; assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_flagship_tutorial_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    env = {**os.environ, "SMOKE_TEST": "1", "MPLBACKEND": "Agg",
           "PYRO_VIKING_FIGURES": str(tmp_path), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tutorials" / "flagship_digits.py")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("digits_examples", "training_curves", "reliability_diagrams", "ood_histograms"):
        png = tmp_path / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000, name
    assert "AUROC" in proc.stdout
    # VIKING's prior scale is a pyro.param tied to σ_ker: it must receive gradients and move
    # away from its initial value e^-2 even in the 3-epoch smoke run.
    learned = re.findall(r"s = σ_ker = ([0-9.]+)", proc.stdout)
    assert learned, proc.stdout[-3000:]
    assert all(abs(float(s) - math.exp(-2)) > 1e-4 for s in learned), learned
    print(f"smoke run: {elapsed:.1f} s")
