"""Where VIKING's predictive gains over its own mean network, and a post-hoc variant.

    python benchmarks/uq/diagnose.py                       # every task x seeds 0 1 2
    python benchmarks/uq/diagnose.py --tasks digits --seeds 0

For each task and seed, at the β the main run chose on validation (``selection.json``; the
default grid's choice when that file is missing), two fits with the main run's budget:

* ``recipe``: the benchmark's VIKING (``viking_fit.fit_viking``: MAP warm-up for 1/12 of the
  epochs, curvature scales, full ELBO for the rest);
* ``post-hoc``: the recipe with no ELBO step (``fit_viking(num_steps=0)``): MAP for the whole
  budget, then the curvature scales, the posterior centred at the MAP.

Each is scored on the test split twice: the Bayesian model average of S posterior samples
(projected on the fit split, as in the main run), and its mean network θ̂ alone (plug-in). The
mean top-class probability ("confidence") of both is printed beside the accuracy. Writes
``diagnose.json`` and ``diagnose.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pyro  # noqa: E402
import torch  # noqa: E402

from benchmarks.uq.methods import _seed  # noqa: E402
from benchmarks.uq.metrics import classification_metrics, regression_metrics  # noqa: E402
from benchmarks.uq.protocol import KNOBS, TASKS, budget_for, viking_knob  # noqa: E402
from benchmarks.uq.report import mean_std  # noqa: E402
from benchmarks.uq.tasks import load_task  # noqa: E402
from benchmarks.uq.viking_fit import (  # noqa: E402
    DEFAULT_GAMMA,
    DEFAULT_OPTIONS,
    _fitted,
    fit_viking,
    make_bnn,
)
from pyro_viking.infer.recipe.fit import fit_viking as recipe_fit_viking  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("recipe", "post-hoc")


def chosen_beta(task: str) -> float:
    """β the main run chose on validation (its ``selection.json``), else the knob's default."""
    path = HERE / "selection.json"
    if path.exists():
        table = json.loads(path.read_text())
        if task in table and "VIKING" in table[task]:
            return viking_knob(table[task]["VIKING"]["chosen"])[1]
    return viking_knob(KNOBS["VIKING"][2])[1]


def fit_post_hoc(task, seed: int, beta: float, budget):
    """MAP for the whole budget, then the curvature scales; no ELBO step."""
    _seed(seed)
    bnn = make_bnn(task, seed, budget.batch_size)
    steps = budget.epochs * math.ceil(len(task.x_fit) / budget.batch_size)
    start = time.perf_counter()
    fit = recipe_fit_viking(bnn, task.x_fit, task.y_fit, num_steps=0, warmup_steps=steps,
                            beta=beta, optim=pyro.optim.Adam({"lr": budget.lr}),
                            gamma=DEFAULT_GAMMA, guide_options=DEFAULT_OPTIONS, progress=False)
    return _fitted(task, bnn, fit.guide, budget, time.perf_counter() - start, beta=beta)


def scores(task, fitted) -> dict:
    """BMA and plug-in (mean network) test metrics, with mean confidences."""
    bnn, guide = fitted.info["bnn"], fitted.info["guide"]
    samples = fitted.sample(task.x_test).detach()
    bnn.set_weights(guide.median())
    with torch.no_grad():
        point = bnn.network(task.x_test)
    if task.classification:
        point = point.softmax(-1)[None]
        bma, plug = (classification_metrics(p, task.y_test) for p in (samples, point))
        bma["confidence"] = float(samples.double().mean(0).max(-1).values.mean())
        plug["confidence"] = float(point.double()[0].max(-1).values.mean())
    else:
        bma = regression_metrics(samples, fitted.noise, task.y_test)
        plug = regression_metrics(point.reshape(1, -1), fitted.noise, task.y_test)
    out = {f"bma_{k}": v for k, v in bma.items()}
    out.update({f"plugin_{k}": v for k, v in plug.items()})
    return out


def table(rows: list) -> str:
    keys = [("bma_nll", "NLL BMA"), ("plugin_nll", "NLL θ̂"), ("bma_ece", "ECE BMA"),
            ("plugin_ece", "ECE θ̂"), ("bma_accuracy", "acc BMA"),
            ("bma_confidence", "conf. BMA"), ("plugin_confidence", "conf. θ̂"),
            ("sigma_im", "σ_im"), ("sigma_ker", "σ_ker")]
    lines = ["| task | variant | β | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    for (task, variant), rs in groups.items():
        cells = []
        for key, _ in keys:
            m, s = mean_std([r.get(key) for r in rs])
            if m is None:
                cells.append("–")
                continue
            cells.append(f"{m:.4f} ± {s:.4f}" if abs(m) < 0.1 else f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {task} | {variant} | {rs[0]['beta']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    for name in args.tasks:
        task = load_task(name)
        budget = budget_for(name, args.quick)
        beta = chosen_beta(name)
        for seed in args.seeds:
            for variant in args.variants:
                pyro.clear_param_store()
                fit = (fit_viking if variant == "recipe" else fit_post_hoc)(
                    task, seed, beta, budget)
                row = {"task": name, "seed": seed, "variant": variant, "beta": beta,
                       "sigma_im": fit.info["sigma_im"], "sigma_ker": fit.info["sigma_ker"],
                       **scores(task, fit)}
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnose.json").write_text(json.dumps(rows, indent=1))
    (args.out / "diagnose.md").write_text(table(rows) + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
