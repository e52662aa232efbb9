"""The uncertainty benchmark's report helpers (benchmarks/uq/report.py): issue #10's bar and the
merge of re-run methods. Pure Python; no optional packages."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ belongs to the checkout, not to the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.uq import report  # noqa: E402

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
