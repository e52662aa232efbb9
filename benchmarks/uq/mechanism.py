"""Why VIKING's posterior does or does not beat the point estimate it is built around (issue #21's
mechanism study), on the benchmark's tasks and protocol (``viking_fit.py``):

- **recipe** (how the mean is trained under the noise): the full ELBO after a short warm-up
  (the library's ``fit_viking``); the same with θ̂'s learning rate a tenth of the scales'; the
  posterior at a MAP of the whole budget with the curvature scales and no ELBO step
  (``fit_viking(num_steps=0)``); a MAP of all but the last twelfth of the budget, then σ_im and
  the prior scale trained by the ELBO with θ̂ frozen (the paper's σ-only phase); the full ELBO
  with σ_ker learned apart from the prior scale;
- **β**: every recipe at every KL weight of the grid, so a recipe is compared at its own best
  β (chosen on the validation split of seed 0, as the benchmark chooses every method's knob);
- **how far samples leave the fit** (lever 4): on the fit split, the mean NLL of the network at
  kernel-only samples ``θ̂ + σ_ker Pε`` and at image-only samples ``θ̂ + σ_im (I − P)ε`` minus
  its NLL at θ̂, overall and with only one layer perturbed, against ``‖σ_ker Pε‖ / ‖θ̂‖`` of that
  layer.

    python benchmarks/uq/mechanism.py --tasks digits boston --seeds 0 1 2 --out /tmp/mech
    python benchmarks/uq/mechanism.py --report benchmarks/uq      # tables from mechanism.json

Writes ``mechanism.json`` (a row per task, recipe, β and seed) and ``mechanism.md`` (each
recipe at its validation-chosen β against the MAP of ``results.json``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.uq.ablations import _scores  # noqa: E402
from benchmarks.uq.protocol import budget_for  # noqa: E402
from benchmarks.uq.report import mean_std  # noqa: E402
from benchmarks.uq.tasks import load_task, task_for_seed  # noqa: E402
from benchmarks.uq.viking_fit import fit_viking, phase_epochs  # noqa: E402

HERE = Path(__file__).resolve().parent
BETAS = (0.1, 0.01, 0.001, 0.0001)


def recipes(epochs: int) -> Dict[str, dict]:
    """The recipes compared: name → options of the benchmark's ``fit_viking``."""
    k = phase_epochs(epochs)[0]
    return {
        "full ELBO (default)": {},
        "full ELBO, θ̂ lr ÷10": {"mean_lr_factor": 0.1},
        "full ELBO, σ_ker learned": {"kernel_scale": "learned"},
        "post-hoc (curvature scales)": {"post_hoc": True},
        f"post-hoc + {k} epochs scales-only": {"post_hoc": True, "scales_epochs": k},
    }


def _loss(bnn, values: Dict[str, torch.Tensor], x, y) -> torch.Tensor:
    """Per-datum NLL of the network at the latent values ``{param name: tensor}``: the model's
    own rows, as its training step computes them."""
    return -bnn.row_log_likelihood(bnn.forward_network(values, x), y)


@torch.no_grad()
def departure(task, fitted, num_samples: int = 16) -> dict:
    """Lever 4: training-NLL increase at kernel-only and image-only samples, overall and per
    layer (only that layer's parameters perturbed), with the layers' relative noise norms."""
    bnn, guide = fitted.info["bnn"], fitted.info["guide"]
    x, y = task.x_fit, task.y_fit
    guide.project_training_data(x, y, num_samples=num_samples)
    e, k = guide.projected_samples
    loc = guide.loc.detach()
    sk, si = float(guide.kernel_scale), float(guide.image_scale.detach())
    layout = guide.layout
    prefix = bnn.name + "."

    def params(z):
        return {n[len(prefix):]: v for n, v in layout.unpack(z).items()}

    base = _loss(bnn, params(loc), x, y).mean()
    out = {"train_nll_at_mean": float(base)}
    for kind, noise in (("kernel", sk * k), ("image", si * (e - k))):
        gaps = [_loss(bnn, params(loc + noise[s]), x, y).mean() - base
                for s in range(num_samples)]
        out[f"train_nll_gap_{kind}"] = float(torch.stack(gaps).mean())
        out[f"rel_norm_{kind}"] = float(noise.norm(dim=1).mean() / loc.norm())
    layers = {}
    for name, part in zip(layout.names, layout.split(torch.arange(loc.shape[0]))):
        idx = part.reshape(-1)
        mask = torch.zeros_like(loc)
        mask[idx] = 1.0
        gaps = [_loss(bnn, params(loc + mask * sk * k[s]), x, y).mean() - base
                for s in range(num_samples)]
        rel = (sk * k[:, idx]).norm(dim=1).mean() / loc[idx].norm().clamp_min(1e-12)
        layers[name[len(prefix):]] = {"gap": float(torch.stack(gaps).mean()), "rel": float(rel)}
    out["layers"] = layers
    return out


def run(args) -> List[dict]:
    rows: List[dict] = []
    path = args.out / "mechanism.json"
    if path.exists() and args.resume:
        rows = json.loads(path.read_text())
    done = {(r["task"], r["recipe"], r["beta"], r["seed"]) for r in rows}
    for task_name in args.tasks:
        base = load_task(task_name)
        budget = budget_for(task_name, False)
        if args.epochs:
            budget.epochs = args.epochs
        for seed in args.seeds:
            task = task_for_seed(base, seed, False)
            for recipe, options in recipes(budget.epochs).items():
                if args.recipes and not any(r in recipe for r in args.recipes):
                    continue
                for beta in args.betas:
                    if (task_name, recipe, beta, seed) in done:
                        continue
                    fitted = fit_viking(task, seed, beta, budget, **options)
                    row = {"task": task_name, "recipe": recipe, "beta": beta, "seed": seed,
                           **_scores(task, fitted), "epoch_seconds": fitted.epoch_seconds,
                           **{k: v for k, v in fitted.info.items()
                              if isinstance(v, (int, float))}}
                    if args.departure:
                        row.update(departure(task, fitted))
                    rows.append(row)
                    print(f"{task_name} {recipe} β={beta:g} seed {seed}: val NLL "
                          f"{row['val_nll']:.4f} test NLL {row['nll']:.4f} σ_im "
                          f"{row['sigma_im']:.2e} σ_ker {row['sigma_ker']:.2e}", flush=True)
                    path.write_text(json.dumps(rows, indent=1))
    return rows


COLS = (("nll", "test NLL"), ("ece", "ECE"), ("accuracy", "acc"), ("rmse", "RMSE"),
        ("coverage90", "90% cov."), ("ood_auroc", "AUROC H"), ("ood_auroc_var", "AUROC var"),
        ("sigma_im", "σ_im"), ("sigma_ker", "σ_ker"), ("train_nll_gap_kernel", "ΔNLL ker"),
        ("rel_norm_kernel", "‖ker‖/‖θ̂‖"))


def report(rows: List[dict], results: List[dict]) -> str:
    """Per task: each recipe at the β with the best seed-0 validation NLL (mean ± std over
    seeds of the test metrics), the same recipe's mean validation NLL at every β, and MAP's
    test row from the main run's ``results``."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"#### {task}", "", "| recipe | β (val) | val NLL by β | "
                  + " | ".join(c[1] for c in COLS) + " |", "|---" * (len(COLS) + 3) + "|"]
        mine = [r for r in rows if r["task"] == task]
        for recipe in dict.fromkeys(r["recipe"] for r in mine):
            rs = [r for r in mine if r["recipe"] == recipe]
            betas = sorted({r["beta"] for r in rs}, reverse=True)
            seed0 = {r["beta"]: r["val_nll"] for r in rs if r["seed"] == min(x["seed"] for x in rs)}
            best = min(seed0, key=lambda b: seed0[b] if math.isfinite(seed0[b]) else math.inf)
            by_beta = ", ".join(f"{b:g}: {_mean_val(rs, b):.3f}"
                                for b in betas)
            cells = _cells([r for r in rs if r["beta"] == best])
            lines.append(f"| {recipe} | {best:g} | {by_beta} | " + " | ".join(cells) + " |")
        maps = [r for r in results if r["task"] == task and r["method"] == "MAP"]
        if maps:
            lines.append("| MAP (results.json) | – | – | " + " | ".join(_cells(maps)) + " |")
        lines.append("")
    return "\n".join(lines)


def _mean_val(rs: List[dict], beta: float) -> float:
    return mean_std([r["val_nll"] for r in rs if r["beta"] == beta])[0]


def _cells(rs: List[dict]) -> List[str]:
    cells = []
    for key, _ in COLS:
        m, s = mean_std([r.get(key) for r in rs])
        cells.append("–" if m is None else f"{m:.3g} ± {s:.2g}")
    return cells


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "diabetes", "boston", "concrete"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--betas", nargs="+", type=float, default=list(BETAS))
    p.add_argument("--recipes", nargs="+", default=None, help="substrings of recipe names")
    p.add_argument("--epochs", type=int, default=None, help="override the task's budget")
    p.add_argument("--departure", action="store_true", help="lever 4's diagnostics")
    p.add_argument("--resume", action="store_true", help="skip rows already in mechanism.json")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--report", type=Path, default=None, help="only re-render from this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    folder = args.report or args.out
    if args.report is None:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args)
    rows = json.loads((folder / "mechanism.json").read_text())
    res_path = HERE / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else []
    text = report(rows, results)
    (folder / "mechanism.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
