"""The uncertainty benchmark's report helpers (benchmarks/uq/report.py, report_shift.py): issue
#10's bar, the merge of re-run methods and the distribution-shift tables. Pure Python apart from
the figures (matplotlib)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ belongs to the checkout, not to the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.uq import report, report_shift  # noqa: E402

pytestmark = pytest.mark.dtype_independent


def _rows(method, nll, ece, acc, task="digits"):
    return [{"task": task, "method": method, "seed": s, "nll": n, "ece": e, "accuracy": a}
            for s, (n, e, a) in enumerate(zip(nll, ece, acc))]


def test_acceptance_uses_the_reference_methods_std():
    by_method = {
        "MAP": _rows("MAP", [0.05, 0.06, 0.07], [0.01, 0.01, 0.01], [0.98, 0.99, 1.0]),
        "VIKING": _rows("VIKING", [0.065] * 3, [0.03] * 3, [0.98] * 3),
    }
    lines = report.acceptance(by_method)
    # NLL: gap 0.005 < MAP's std (0.01) -> holds; ECE: gap 0.02 > 0 -> missed;
    # accuracy: MAP 0.99 ± 0.01, VIKING 0.98 -> holds
    assert "NLL" in lines[0] and "holds" in lines[0]
    assert "ECE" in lines[1] and "missed" in lines[1]
    assert "accuracy" in lines[2] and "holds" in lines[2]
    by_method["VIKING"] = _rows("VIKING", [0.09] * 3, [0.01] * 3, [0.95] * 3)
    lines = report.acceptance(by_method)
    assert "missed" in lines[0] and "holds" in lines[1] and "missed" in lines[2]


def test_merge_replaces_rerun_methods(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    rows_old = _rows("MAP", [0.1] * 2, [0.1] * 2, [0.9] * 2) + \
        _rows("VIKING", [0.5] * 2, [0.5] * 2, [0.5] * 2)
    rows_new = _rows("VIKING", [0.2] * 2, [0.2] * 2, [0.9] * 2)
    (old / "results.json").write_text(json.dumps(rows_old))
    (new / "results.json").write_text(json.dumps(rows_new))
    (old / "selection.json").write_text(json.dumps(
        {"digits": {"MAP": {"knob": "s", "chosen": 3}, "VIKING": {"knob": "beta", "chosen": 1}}}))
    (new / "selection.json").write_text(json.dumps(
        {"digits": {"VIKING": {"knob": "beta", "chosen": 0.001}}}))
    out = tmp_path / "out"
    report.merge([old, new], out)
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["nll"]) for r in rows) == [
        ("MAP", 0.1), ("MAP", 0.1), ("VIKING", 0.2), ("VIKING", 0.2)]
    sel = json.loads((out / "selection.json").read_text())["digits"]
    assert sel["MAP"]["chosen"] == 3 and sel["VIKING"]["chosen"] == 0.001


def _shift_rows(method, accuracies, task="mnist1d"):
    """One row per seed; each seed's accuracy at strengths 0 and 4 (NLL = 1 − accuracy)."""
    return [{"task": task, "method": method, "seed": s, "nll": 0.3,
             "shift": [{"strength": k, "accuracy": a, "nll": 1 - a, "ece": 0.1, "brier": 0.2,
                        "shift_auroc": 0.5, "shift_auroc_var": 0.5 + k / 100}
                       for k, a in zip((0, 4), accs)]}
            for s, accs in enumerate(accuracies)]


def test_shift_curves_average_each_strength_over_seeds():
    rows = _shift_rows("VIKING", [(0.9, 0.7), (0.8, 0.5)]) + _shift_rows("MAP", [(0.9, 0.6)]) \
        + [{"task": "digits", "method": "MAP", "seed": 0, "nll": 0.1}]  # no shift: left out
    curves = report_shift.shift_curves(rows)
    assert list(curves) == ["mnist1d"]
    assert list(curves["mnist1d"]) == ["MAP", "VIKING"]  # the protocol's order of methods
    (k0, m0, s0), (k4, m4, s4) = curves["mnist1d"]["VIKING"]["accuracy"]
    assert (k0, k4) == (0, 4)
    assert m0 == pytest.approx(0.85) and s0 == pytest.approx(0.0707107, rel=1e-5)
    assert m4 == pytest.approx(0.6) and s4 == pytest.approx(0.1414214, rel=1e-5)
    assert curves["mnist1d"]["MAP"]["shift_auroc_var"][1] == (4, pytest.approx(0.54), 0.0)
    text = report_shift.shift_markdown(rows)
    assert "### mnist1d under circular shifts" in text
    assert "| VIKING | 4 | 0.600 ± 0.141 | 0.400 ± 0.141 |" in text
    assert report_shift.shift_markdown(rows[-1:]) == ""


def test_write_report_adds_the_shift_table_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(r, accuracy=0.9, ece=0.05, brier=0.1, ood_auroc=0.8, ood_auroc_var=0.7,
                 epoch_seconds=0.1, predict_seconds=0.01)
            for r in _shift_rows("MAP", [(0.9, 0.7), (0.8, 0.5)])]
    text = report.write_report(rows, tmp_path)
    assert "### mnist1d (2 seeds" in text and "under circular shifts" in text
    assert (tmp_path / "mnist1d.png").exists() and (tmp_path / "mnist1d_shift.png").exists()
    assert report.mean_std([1.0, 3.0, None]) == (2.0, pytest.approx(2 ** 0.5))
