"""The distribution-shift part of the report: per task, each method's metrics against the shift
strength (mean ± std over seeds), as a markdown table and one figure ``<task>_shift.png``.

Reads the ``shift`` list of the ``results.json`` rows (``scoring.score_shifts``: one entry per
strength with ``accuracy``, ``nll``, ``ece``, ``brier``, ``shift_auroc``, ``shift_auroc_var``).
Pure Python apart from matplotlib (imported by the plot only)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.uq.protocol import METHODS, TASKS
from benchmarks.uq.stats import mean_std

#: (key, column title, figure title); the figure shows the first three
SHIFT_COLUMNS = [("accuracy", "acc", "accuracy ↑"), ("nll", "NLL", "NLL ↓"),
                 ("ece", "ECE", "ECE ↓"), ("shift_auroc_var", "AUROC var", "AUROC var ↑")]
#: one colour per method, VIKING in red (C3) as in the other figures
COLORS = dict(zip(METHODS, ("C0", "C1", "C2", "C4", "C5", "C7", "C3")))


def shift_curves(rows: List[dict]) -> Dict[str, Dict[str, Dict[str, list]]]:
    """task → method → key → [(strength, mean, std) for each strength], over the rows' seeds,
    for the rows that carry a ``shift`` list (tasks and methods in the protocol's order)."""
    order = {t: i for i, t in enumerate(TASKS)}
    out: Dict[str, Dict[str, Dict[str, list]]] = {}
    per: Dict[Tuple[str, str], Dict[int, List[dict]]] = {}
    for r in rows:
        for entry in r.get("shift") or []:
            per.setdefault((r["task"], r["method"]), {}).setdefault(
                entry["strength"], []).append(entry)
    for (task, method), by_strength in sorted(
            per.items(), key=lambda kv: (order.get(kv[0][0], len(order)),
                                         METHODS.index(kv[0][1]) if kv[0][1] in METHODS
                                         else len(METHODS))):
        curves = out.setdefault(task, {}).setdefault(method, {})
        for key, _, _ in SHIFT_COLUMNS:
            curves[key] = [(k, *mean_std([e.get(key) for e in entries]))
                           for k, entries in sorted(by_strength.items())]
    return out


def _cell(mean: Optional[float], std: Optional[float]) -> str:
    return "–" if mean is None else f"{mean:.3f} ± {std:.3f}"


def shift_markdown(rows: List[dict]) -> str:
    """One table per task with shifts: a row per method and strength, the metrics of
    :data:`SHIFT_COLUMNS` (``shift_auroc_var``: the shifted inputs told from the clean test
    inputs by the max-over-classes variance)."""
    lines = []
    for task, methods in shift_curves(rows).items():
        lines += [f"### {task} under circular shifts of the test inputs (mean ± std over "
                  "seeds)", "",
                  "| method | shift | " + " | ".join(c[1] for c in SHIFT_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(SHIFT_COLUMNS)]
        for method, curves in methods.items():
            for i, (strength, _, _) in enumerate(curves["nll"]):
                cells = [_cell(*curves[key][i][1:]) for key, _, _ in SHIFT_COLUMNS]
                lines.append(f"| {method} | {strength} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_shift(rows: List[dict], out: Path) -> List[Path]:
    """``<task>_shift.png`` per task with shifts: accuracy, NLL and ECE against the shift
    strength, one line (mean ± std over seeds) per method, VIKING in red. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, methods in shift_curves(rows).items():
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        for ax, (key, _, title) in zip(axes, SHIFT_COLUMNS[:3]):
            for method, curves in methods.items():
                pts = [p for p in curves[key] if p[1] is not None]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] for p in pts], label=method, capsize=2, marker="o",
                            ms=3, color=COLORS.get(method, "k"))
            ax.set_xticks(sorted({p[0] for c in methods.values() for p in c[key]}))
            ax.set_xlabel("shift (positions)")
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{task}: test inputs rolled circularly (mean ± std over seeds)")
        fig.tight_layout()
        path = out / f"{task}_shift.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
