"""MAP learning curves, to size each task's epoch budget (``protocol.EPOCHS``).

    python benchmarks/uq/learning_curves.py                    # every task, seed 0
    python benchmarks/uq/learning_curves.py --tasks mnist1d --epochs 300

Trains the benchmark's MAP (``methods.fit_map``: the main run's Adam learning rate and
minibatch size) at every prior scale of ``--prior-scales`` (default: MAP's validation grid,
``protocol.KNOBS``) for ``--epochs`` (default ``CURVE_EPOCHS``, longer than the budget) and
after every epoch scores the network on the fit, validation and test splits: NLL, and accuracy
(classification) or RMSE (regression). Writes ``learning_curves_<task>.png`` (validation and fit
NLL, validation accuracy / RMSE per epoch, one colour per prior scale; the budget
``protocol.EPOCHS[task]`` marked) and ``learning_curves.json`` (task → prior scale → the curve, the
seconds per epoch of the training alone, the epoch of the smallest validation NLL and the first
epoch within ``PLATEAU_TOL`` of it) to ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.uq.methods import fit_map  # noqa: E402
from benchmarks.uq.metrics import classification_metrics, regression_metrics  # noqa: E402
from benchmarks.uq.protocol import KNOBS, TASKS, budget_for  # noqa: E402
from benchmarks.uq.tasks import load_task, quick_task  # noqa: E402

HERE = Path(__file__).resolve().parent
#: epochs each curve runs (beyond the budget, to see the plateau)
CURVE_EPOCHS = {"digits": 200, "digits_resnet": 200, "mnist1d": 300, "diabetes": 500, "boston": 500,
                "concrete": 500}
#: "plateaued": the validation NLL within this fraction of its smallest value
PLATEAU_TOL = 0.02


def _scores(task, net, log_noise) -> dict:
    """NLL and accuracy / RMSE of the network (in eval mode: batch norms on their running
    statistics) on the fit, validation and test splits."""
    out, training = {}, net.training
    net.eval()
    with torch.no_grad():
        for split in ("fit", "val", "test"):
            x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
            pred = net(x)
            if task.classification:
                m = classification_metrics(pred.softmax(-1)[None], y)
                out.update({f"{split}_nll": m["nll"], f"{split}_accuracy": m["accuracy"]})
            else:
                m = regression_metrics(pred.reshape(1, -1), float(log_noise.exp()), y)
                out.update({f"{split}_nll": m["nll"], f"{split}_rmse": m["rmse"]})
    net.train(training)
    return out


def curve(task, epochs: int, seed: int, prior_scale: float, quick: bool = False) -> dict:
    """MAP trained for ``epochs`` with the task's budget; the scores after every epoch."""
    budget = replace(budget_for(task.name, quick), epochs=epochs)
    rows = []
    fitted = fit_map(task, seed, prior_scale, budget,
                     on_epoch=lambda e, net, noise: rows.append(
                         {"epoch": e, **_scores(task, net, noise)}))
    val = [r["val_nll"] for r in rows]
    best = min(range(len(val)), key=val.__getitem__)
    plateau = next(i for i, v in enumerate(val) if v <= val[best] + PLATEAU_TOL * abs(val[best]))
    return {"task": task.name, "seed": seed, "prior_scale": prior_scale,
            "batch_size": budget.batch_size, "lr": budget.lr, "fit_size": len(task.x_fit),
            "epoch_seconds": fitted.epoch_seconds, "best_epoch": rows[best]["epoch"],
            "plateau_epoch": rows[plateau]["epoch"],
            "budget": budget_for(task.name, quick).epochs,
            "curve": {k: [r[k] if k == "epoch" else float(f"{r[k]:.4g}") for r in rows]
                      for k in rows[0]}}


def at_epoch(result: dict, epoch: int) -> dict:
    """The scores of one :func:`curve` after ``epoch`` epochs (``{}`` beyond its end)."""
    c = result["curve"]
    if epoch not in c["epoch"]:
        return {}
    i = c["epoch"].index(epoch)
    return {k: v[i] for k, v in c.items()}


def dumps(results: dict) -> str:
    """``results`` as indented JSON with every list of numbers on one line."""
    text = json.dumps(results, indent=1)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]",
                  lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)


def plot_curves(results: dict, out: Path) -> Path:
    """``learning_curves_<task>.png`` of one task's curves (prior scale → :func:`curve`):
    NLL (validation solid, fit dotted) and validation accuracy / RMSE against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    second = "accuracy" if "val_accuracy" in first["curve"] else "rmse"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (scale, result) in enumerate(results.items()):
        c, color = result["curve"], f"C{i}"
        axes[0].plot(c["epoch"], c["val_nll"], color=color, label=f"s = {scale}: validation")
        axes[0].plot(c["epoch"], c["fit_nll"], color=color, ls=":", alpha=0.7,
                     label=f"s = {scale}: fit")
        axes[1].plot(c["epoch"], c[f"val_{second}"], color=color,
                     label=f"s = {scale} ({result['epoch_seconds']:.3f} s/epoch)")
    axes[0].set_ylabel("NLL")
    if second == "accuracy":
        axes[0].set_yscale("log")
    else:  # a regression NLL goes negative (a density): linear within ±1, logarithmic beyond
        axes[0].set_yscale("symlog", linthresh=1.0)
    axes[1].set_ylabel(f"validation {second}")
    for ax in axes:
        if first["budget"]:
            ax.axvline(first["budget"], color="k", ls="--", lw=1, label="budget")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(f"{first['task']}: MAP learning curves (seed {first['seed']}, "
                 f"B = {first['batch_size']}, Adam {first['lr']:g})")
    fig.tight_layout()
    path = out / f"learning_curves_{first['task']}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _summary(name: str, scale: float, result: dict) -> str:
    at = at_epoch(result, result["budget"])
    scores = ", ".join(f"{k} {v:.3f}" for k, v in at.items() if k != "epoch")
    return (f"{name} s={scale:g}: {result['epoch_seconds']:.4f} s/epoch, best val NLL at "
            f"epoch {result['best_epoch']}, within {PLATEAU_TOL:.0%} of it from epoch "
            f"{result['plateau_epoch']}; at the budget ({result['budget']}): {scores}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--epochs", type=int, default=None, help="default: CURVE_EPOCHS[task]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior-scales", nargs="+", type=float, default=list(KNOBS["MAP"][1]))
    p.add_argument("--quick", action="store_true", help="the --quick tasks (a smoke run)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replot", action="store_true",
                   help="only redraw the figures of --out's json, marking today's budgets")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "learning_curves.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.replot:
        for name, by_scale in results.items():
            for result in by_scale.values():
                result["budget"] = budget_for(name, args.quick).epochs
            plot_curves(by_scale, args.out)
        path.write_text(dumps(results))
        return results
    for name in args.tasks:
        task = quick_task(name) if args.quick else load_task(name)
        results[name] = {}
        for scale in args.prior_scales:
            result = curve(task, args.epochs or CURVE_EPOCHS[name], args.seed, scale,
                           args.quick)
            results[name][f"{scale:g}"] = result
            path.write_text(dumps(results))
            print(_summary(name, scale, result), flush=True)
        plot_curves(results[name], args.out)
    return results


if __name__ == "__main__":
    main()
