"""Ablations of VIKING's design choices (issue #10, point 6), run by ``run.py --ablations``.

Every setting changes one thing of the benchmark's VIKING configuration (``viking_fit.py``;
β from ``--ablation-beta``, else as chosen on validation for the task in ``selection.json``,
else 0.03, the library's default for classification BNNs) and is scored on
the validation split (what a default should be chosen on) and on the test/OOD sets:

- ``kernel``: the kernel of the loss Jacobian (the default) vs the Fisher-Rao metric's
  (``jacobian="fisher"``, the paper's);
- ``recipe``: the full recipe vs the posterior at a MAP trained for the whole budget with the
  curvature scales (``fit_viking(num_steps=0)``);
- ``predictive``: the network at posterior samples vs its linearisation at θ̂ (GLM);
- ``gamma``: memory γ ∈ {0, 0.2, 0.5, 0.8, 1} of the stochastic alternating projections;
- ``grad_through_projection``: implicit gradient through P(θ̂) vs stopped;
- ``warmup``: MAP warm-up epochs: 0 (AutoViking from the random initialisation), 1, the
  default (1/12 of the epochs) and 3× the default;
- ``particles``: K = 4 sequential particles of B = 64 (each its own minibatch) vs one particle
  on B = 256 vs the default K = 1, B = 64 (same examples per epoch: the K = 4 and B = 256
  settings take a quarter of the steps);
- ``image_noise``: a fresh image draw vs the paper's carried ``e − P_t e``;
- ``rank_estimator``: the exact rank (what ``"auto"`` picks with a direct solver) vs
  Hutchinson on the kernel side vs the image-side estimate.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.uq.metrics import classification_metrics, regression_metrics  # noqa: E402
from benchmarks.uq.protocol import Budget, budget_for, viking_knob  # noqa: E402
from benchmarks.uq.report import mean_std  # noqa: E402
from benchmarks.uq.tasks import load_task, quick_task  # noqa: E402
from benchmarks.uq.viking_fit import (  # noqa: E402
    DEFAULT_GAMMA,
    DEFAULT_OPTIONS,
    fit_viking,
    phase_epochs,
)

ABLATIONS: Dict[str, List[tuple]] = {  # in order of priority (partial runs keep the first)
    "kernel": [("loss Jacobian", {}), ("Fisher-Rao", {"jacobian": "fisher"})],
    "recipe": [("full ELBO", {}), ("post-hoc (MAP + curvature scales)", {"post_hoc": True})],
    "predictive": [("sampled", {}), ("linearised", {"predictive": "linearised"})],
    "gamma": [(f"γ={g:g}", {"gamma": g}) for g in (0.0, 0.2, 0.5, 0.8, 1.0)],
    "grad_through_projection": [("stopped", {"grad_through_projection": False}),
                                ("implicit", {"grad_through_projection": True})],
    "particles": [("K=1, B=64", {}), ("K=4, B=64", {"particles": 4}),
                  ("K=1, B=256", {"batch_size": 256})],
    "image_noise": [("fresh", {"image_noise": "fresh"}), ("carried", {"image_noise": "carried"})],
    "rank_estimator": [("exact (auto)", {}), ("hutchinson", {"rank_estimator": "hutchinson"}),
                       ("image", {"rank_estimator": "image"})],
    "warmup": [],  # filled per budget: 0, 1, the default (1/12 of the epochs), 3× the default
}
QUICK = {"gamma": [ABLATIONS["gamma"][0]], "image_noise": ABLATIONS["image_noise"]}


def _key(options: dict, warmup: int) -> str:
    """Settings equal to the default configuration share one cache key."""
    full = {**DEFAULT_OPTIONS, "gamma": DEFAULT_GAMMA, "warmup": warmup, "particles": 1,
            "batch_size": 64, "rank_estimator": "auto", "image_noise": "fresh",
            "post_hoc": False, "predictive": "sampled", **options}
    return json.dumps(full, sort_keys=True)


def _scores(task, fitted) -> dict:
    x = torch.cat([task.x_val, task.x_test, task.x_ood])
    s = fitted.sample(x).detach()
    v, t, o = torch.split(s, [len(task.x_val), len(task.x_test), len(task.x_ood)], dim=1)
    if task.classification:
        val = classification_metrics(v, task.y_val)
        test = classification_metrics(t, task.y_test, o)
    else:
        val = regression_metrics(v, fitted.noise, task.y_val)
        test = regression_metrics(t, fitted.noise, task.y_test, o)
    return {**{f"val_{k}": x for k, x in val.items()}, **test}


def run_ablations(args) -> list:
    out: Path = args.out
    tasks = [t for t in args.tasks if t != "diabetes"] or args.tasks
    seeds = [args.seeds[0]] if args.quick else args.seeds
    sel_path = out / "selection.json"
    selection = json.loads(sel_path.read_text()) if sel_path.exists() else {}
    rows, cache = [], {}
    for task_name in tasks:
        task = quick_task(task_name) if args.quick else load_task(task_name)
        budget: Budget = budget_for(task_name, args.quick)
        if args.ablation_epochs:
            budget = replace(budget, epochs=args.ablation_epochs)
        beta = args.ablation_beta or viking_knob(selection.get(task_name, {}).get(
            "VIKING", {}).get("chosen", 0.03))[1]
        w0 = phase_epochs(budget.epochs)[0]
        ablations = dict(QUICK if args.quick else ABLATIONS)
        if getattr(args, "ablation_only", None):
            ablations = {k: v for k, v in ABLATIONS.items() if k in args.ablation_only}
        if "warmup" in ablations:
            ablations["warmup"] = [(f"{w} epochs", {"warmup": w})
                                   for w in sorted({0, 1, w0, 3 * w0})]
        for ablation, settings in ablations.items():
            for label, options in settings:
                for seed in seeds:
                    key = (task_name, seed, _key(options, w0))
                    if key not in cache:
                        opts = {"warmup": w0, **options}
                        fitted = fit_viking(task, seed, beta, budget, **opts)
                        cache[key] = {**_scores(task, fitted),
                                      "epoch_seconds": fitted.epoch_seconds,
                                      **{k: v for k, v in fitted.info.items()
                                         if isinstance(v, (int, float))}}
                    rows.append({"task": task_name, "ablation": ablation, "setting": label,
                                 "seed": seed, **cache[key]})
                    r = rows[-1]
                    print(f"  {task_name}/{ablation}/{label} seed {seed}: val NLL "
                          f"{r['val_nll']:.4f} test NLL {r['nll']:.4f} "
                          f"{r['epoch_seconds']:.3f} s/epoch", flush=True)
                    (out / "ablations.json").write_text(json.dumps(rows, indent=1))
    text = ablation_markdown(rows)
    (out / "ablations.md").write_text(text)
    plot_ablations(rows, out)
    print(text)
    return rows


COLS = [("val_nll", "val NLL"), ("val_accuracy", "val acc"), ("nll", "test NLL"),
        ("accuracy", "test acc"), ("ece", "test ECE"), ("ood_auroc", "AUROC H"),
        ("ood_auroc_var", "AUROC var"), ("epoch_seconds", "s/epoch")]


def _groups(rows):
    g: Dict[tuple, Dict[str, List[dict]]] = {}
    for r in rows:
        g.setdefault((r["task"], r["ablation"]), {}).setdefault(r["setting"], []).append(r)
    return g


def ablation_markdown(rows: List[dict]) -> str:
    lines = []
    for (task, ablation), settings in _groups(rows).items():
        lines += [f"#### {task}: {ablation}", "",
                  "| setting | " + " | ".join(c[1] for c in COLS) + " |",
                  "|---" * (len(COLS) + 1) + "|"]
        for label, rs in settings.items():
            cells = []
            for k, _ in COLS:
                m, s = mean_std([r.get(k) for r in rs])
                cells.append("–" if m is None else f"{m:.3f} ± {s:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_ablations(rows: List[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("val_nll", "validation NLL"), ("nll", "test NLL"), ("ece", "test ECE"),
            ("ood_auroc_var", "OOD AUROC (var)"), ("epoch_seconds", "s/epoch")]
    for (task, ablation), settings in _groups(rows).items():
        labels = list(settings)
        fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.2))
        for ax, (k, title) in zip(axes, keys):
            stats = [mean_std([r.get(k) for r in settings[lab]]) for lab in labels]
            ax.bar(range(len(labels)), [s[0] if s[0] is not None else math.nan for s in stats],
                   yerr=[s[1] or 0 for s in stats], capsize=3, color="C3")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
            vals = [s[0] for s in stats if s[0] is not None]
            if vals and k != "epoch_seconds":
                lo, hi = min(vals), max(vals)
                pad = 0.3 * (hi - lo) + 1e-3
                ax.set_ylim(max(0.0, lo - pad - max(s[1] or 0 for s in stats)), hi + pad +
                            max(s[1] or 0 for s in stats))
        fig.suptitle(f"VIKING ablation on {task}: {ablation} (mean ± std over seeds)")
        fig.tight_layout()
        fig.savefig(out / f"ablation_{task}_{ablation}.png", dpi=90)
        plt.close(fig)


if __name__ == "__main__":  # re-render tables and figures from FOLDER/ablations.json
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    rows = json.loads((folder / "ablations.json").read_text())
    (folder / "ablations.md").write_text(ablation_markdown(rows))
    plot_ablations(rows, folder)
    print(ablation_markdown(rows))
