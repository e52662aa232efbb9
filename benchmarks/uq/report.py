"""Markdown table (mean ± std over seeds, per task) and figures from ``results.json`` rows;
the distribution-shift tables and figures come from ``report_shift.py``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.uq.protocol import METHODS, TASKS, knob_label  # noqa: E402
from benchmarks.uq.report_shift import plot_shift, shift_markdown  # noqa: E402
from benchmarks.uq.stats import mean_std  # noqa: E402

__all__ = ["acceptance", "markdown", "mean_std", "merge", "per_pass_ratio", "plot",
           "write_report"]

CLASSIFICATION = [("accuracy", "acc ↑"), ("nll", "NLL ↓"), ("ece", "ECE ↓"), ("brier", "Brier ↓"),
                  ("ood_auroc", "AUROC H ↑"), ("ood_auroc_var", "AUROC var ↑"),
                  ("epoch_seconds", "s/epoch"), ("predict_seconds", "predict s")]
REGRESSION = [("nll", "NLL ↓"), ("rmse", "RMSE ↓"), ("coverage90", "90% cov."),
              ("ood_auroc", "AUROC std ↑"), ("ood_auroc_var", "AUROC var ↑"),
              ("ood_nll", "OOD NLL ↓"), ("epoch_seconds", "s/epoch"),
              ("predict_seconds", "predict s")]


def _fmt(m, s, key) -> str:
    if m is None:
        return "–"
    digits = 2 if key in ("epoch_seconds", "predict_seconds") else 3
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def group(rows: List[dict]) -> Dict[str, Dict[str, List[dict]]]:
    out: Dict[str, Dict[str, List[dict]]] = {}
    order = {t: i for i, t in enumerate(TASKS)}
    for r in sorted(rows, key=lambda r: order.get(r["task"], len(order))):  # stable
        out.setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    return out


def per_pass_ratio(by_method: Dict[str, List[dict]], other: str = "IVON") -> Optional[float]:
    """VIKING's mean seconds per pass over the fit split ÷ ``other``'s."""
    if "VIKING" not in by_method or other not in by_method:
        return None
    v, _ = mean_std([r["epoch_seconds"] for r in by_method["VIKING"]])
    i, _ = mean_std([r["epoch_seconds"] for r in by_method[other]])
    return v / i if v and i else None


def acceptance(by_method: Dict[str, List[dict]]) -> List[str]:
    """Issue #10's bar, per metric: VIKING's mean against the best method's mean (accuracy:
    against MAP's), *within one std* meaning within the reference method's seed std."""
    if "VIKING" not in by_method:
        return []
    out = []
    v = {k: mean_std([r.get(k) for r in by_method["VIKING"]]) for k in ("nll", "ece", "accuracy")}
    for key in ("nll", "ece"):
        if v[key][0] is None:
            continue
        stats = {m: mean_std([r.get(key) for r in rs]) for m, rs in by_method.items()}
        best = min((m for m in stats if stats[m][0] is not None), key=lambda m: stats[m][0])
        gap = v[key][0] - stats[best][0]
        ok = gap <= stats[best][1]
        out.append(f"{key.upper()}: VIKING {v[key][0]:.3f}, best {best} {stats[best][0]:.3f} ± "
                   f"{stats[best][1]:.3f} (gap {gap:.3f}): **{'holds' if ok else 'missed'}**")
    if v["accuracy"][0] is not None and "MAP" in by_method:
        m, s = mean_std([r.get("accuracy") for r in by_method["MAP"]])
        gap = m - v["accuracy"][0]
        out.append(f"accuracy: VIKING {v['accuracy'][0]:.3f}, MAP {m:.3f} ± {s:.3f}: "
                   f"**{'holds' if gap <= s else 'missed'}**")
    return out


def markdown(rows: List[dict]) -> str:
    lines = []
    for task, by_method in group(rows).items():
        first = next(iter(by_method.values()))[0]
        cols = CLASSIFICATION if first.get("accuracy") is not None else REGRESSION
        n = len(next(iter(by_method.values())))
        lines += [f"### {task} ({n} seed{'s' * (n > 1)}, mean ± std)", "",
                  "| method | " + " | ".join(c[1] for c in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for method in METHODS:
            if method not in by_method:
                continue
            cells = [_fmt(*mean_std([r.get(k) for r in by_method[method]]), k) for k, _ in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ratio = per_pass_ratio(by_method)
        if ratio is not None:
            lines.append("")
            line = f"VIKING / IVON seconds per pass over the data: **{ratio:.1f}×**"
            for other in ("MAP", "AutoNormal"):
                r = per_pass_ratio(by_method, other)
                line += f"; VIKING / {other}: {r:.1f}×" if r else ""
            lines.append(line)
        bar = acceptance(by_method)
        if bar:
            lines += ["", "Issue #10's bar (within one std of the reference's seed spread): "
                      + "; ".join(bar)]
        lines.append("")
    return "\n".join(lines)


def plot(rows: List[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = group(rows)
    for task, by_method in grouped.items():
        first = next(iter(by_method.values()))[0]
        keys = (["accuracy", "nll", "ece", "ood_auroc", "ood_auroc_var", "epoch_seconds"]
                if first.get("accuracy") is not None else
                ["nll", "rmse", "coverage90", "ood_auroc", "ood_auroc_var", "ood_nll",
                 "epoch_seconds"])
        methods = [m for m in METHODS if m in by_method]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
        for ax, key in zip(axes, keys):
            stats = [mean_std([r.get(key) for r in by_method[m]]) for m in methods]
            ax.bar(range(len(methods)), [s[0] or 0 for s in stats],
                   yerr=[s[1] or 0 for s in stats], color=[
                       "C3" if m == "VIKING" else "C0" for m in methods], capsize=3)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
            ax.set_title(key)
            vals = [s[0] for s in stats if s[0] is not None]
            if key in ("accuracy", "ood_auroc", "ood_auroc_var", "coverage90") and vals:
                ax.set_ylim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.03))
            if key == "epoch_seconds":
                ax.set_yscale("log")
        fig.suptitle(f"{task}: mean ± std over seeds")
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=90)
        plt.close(fig)


def write_report(rows: List[dict], out: Path, selection: Optional[dict] = None) -> str:
    text = markdown(rows)
    shift = shift_markdown(rows)
    if shift:
        text += "\n" + shift
    if selection:
        text += "\n### Validation choices (seed 0, BMA NLL on the validation split)\n\n"
        for task, methods in sorted(selection.items(), key=lambda kv: TASKS.index(kv[0])
                                    if kv[0] in TASKS else len(TASKS)):
            parts = [f"{m}: {v['knob']} = {knob_label(v['chosen'])}" for m, v in methods.items()]
            text += f"- {task}: " + "; ".join(parts) + "\n"
    timing = out / "timing.json"
    if timing.exists():
        devices = sorted({t.get("device", "cpu") for t in json.loads(timing.read_text()).values()})
        text += ("\n### Seconds per pass over the fit split, interleaved in one process "
                 f"(`run.py --timing`, median of 9, {', '.join(devices)})\n\n"
                 "| task | MAP | IVON | AutoNormal | "
                 "AutoDelta | VIKING | VIKING / IVON | VIKING / MAP | VIKING / AutoNormal | "
                 "VIKING / AutoDelta |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for task, t in json.loads(timing.read_text()).items():
            s = t["seconds_per_epoch"]
            delta = s.get("AutoDelta", math.nan)  # timing.json files older than this column
            text += (f"| {task} | {s['MAP']:.3f} | {s['IVON']:.3f} | {s['AutoNormal']:.3f} | "
                     f"{delta:.3f} | {s['VIKING']:.3f} | **{t['viking_over_ivon']:.1f}×** | "
                     f"{t['viking_over_map']:.1f}× | {t['viking_over_autonormal']:.2f}× | "
                     f"{s['VIKING'] / delta:.2f}× |\n")
    (out / "results.md").write_text(text)
    plot(rows, out)
    plot_shift(rows, out)
    print(text)
    return text


def merge(folders: List[Path], out: Path) -> None:
    """Merge the results.json / selection.json of several runs (e.g. one process per task, or
    a re-run of one method) into ``out`` and render the report there. A later folder's rows
    replace the earlier rows of the same (task, method), its selections the same method's."""
    rows, selection = [], {}
    for folder in folders:
        new = json.loads((folder / "results.json").read_text())
        redone = {(r["task"], r["method"]) for r in new}
        rows = [r for r in rows if (r["task"], r["method"]) not in redone] + new
        sel = folder / "selection.json"
        if sel.exists():
            for task, methods in json.loads(sel.read_text()).items():
                selection.setdefault(task, {}).update(methods)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    if selection:
        (out / "selection.json").write_text(json.dumps(selection, indent=1))
    write_report(rows, out, selection or None)


if __name__ == "__main__":
    # report.py FOLDER: re-render FOLDER's results; report.py OUT RUN1 RUN2 ...: merge runs
    args = [Path(a) for a in sys.argv[1:]] or [Path(__file__).resolve().parent]
    merge(args[1:] if len(args) > 1 else args[:1], args[0])
