"""VIKING on a batch-norm network: the statistics frozen after the warm-up (the benchmark's
choice) against ``BayesianNetwork(batch_norm="running")`` updating them at θ̂ every step
(``batch_norm_fit.STATISTICS``), at the main run's β and budget.

    python benchmarks/uq/batch_norm_ablation.py --seeds 0 1 2 --out /tmp/bn
    python benchmarks/uq/batch_norm_ablation.py --report benchmarks/uq   # table from the json

For each seed and setting: the test metrics of the BMA (as the main table), the validation NLL
of the BMA and of the mean network θ̂ alone (plug-in, batch norms on their statistics), ‖θ̂‖
and the learned prior scale (= σ_ker). Writes ``batch_norm_ablation.json`` and
``batch_norm_ablation.md`` to ``--out``. β: ``--beta``, else the main run's validation choice
(``selection.json`` in this folder), else the knob's default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.uq import batch_norm_fit  # noqa: E402
from benchmarks.uq.metrics import classification_metrics  # noqa: E402
from benchmarks.uq.protocol import KNOBS, budget_for  # noqa: E402
from benchmarks.uq.scoring import score  # noqa: E402
from benchmarks.uq.stats import mean_std  # noqa: E402
from benchmarks.uq.tasks import load_task  # noqa: E402
from benchmarks.uq.viking_fit import fit_viking  # noqa: E402

HERE = Path(__file__).resolve().parent
TASK = "digits_resnet"
SETTINGS = ("frozen", "running")
COLUMNS = [("val_nll", "val NLL (BMA)"), ("val_plugin_nll", "val NLL (θ̂)"), ("nll", "test NLL"),
           ("accuracy", "test acc"), ("ece", "test ECE"), ("ood_auroc", "AUROC H"),
           ("ood_auroc_var", "AUROC var"), ("loc_norm", "‖θ̂‖"), ("prior_scale", "σ_ker"),
           ("epoch_seconds", "s/epoch")]


def chosen_beta() -> float:
    path = HERE / "selection.json"
    if path.exists():
        table = json.loads(path.read_text())
        if TASK in table and "VIKING" in table[TASK]:
            return float(table[TASK]["VIKING"]["chosen"])
    return KNOBS["VIKING"][2]


def plugin_metrics(task, fitted) -> dict:
    """The mean network θ̂ alone on the validation split, its batch norms in eval mode."""
    bnn, guide = fitted.info["bnn"], fitted.info["guide"]
    net = bnn.set_weights(guide.median())
    modes = {m: m.training for m in net.modules()}
    net.eval()
    with torch.no_grad():
        probs = net(task.x_val).softmax(-1)[None]
    for m, training in modes.items():
        m.train(training)
    return classification_metrics(probs, task.y_val)


def fit_setting(task, seed: int, beta: float, budget, setting: str) -> dict:
    previous, batch_norm_fit.STATISTICS = batch_norm_fit.STATISTICS, setting
    try:
        start = time.perf_counter()
        fitted = fit_viking(task, seed, beta, budget)
        fit_seconds = time.perf_counter() - start
    finally:
        batch_norm_fit.STATISTICS = previous
    test, _ = score(task, fitted, task.x_test, task.y_test, with_ood=True)
    val, _ = score(task, fitted, task.x_val, task.y_val, with_ood=False)
    return {"task": task.name, "setting": setting, "seed": seed, "beta": beta, **test,
            "val_nll": val["nll"], "val_plugin_nll": plugin_metrics(task, fitted)["nll"],
            "epoch_seconds": fitted.epoch_seconds, "fit_seconds": fit_seconds,
            **{k: v for k, v in fitted.info.items() if isinstance(v, float)}}


def markdown(rows: list) -> str:
    lines = ["| statistics | β | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for setting in SETTINGS:
        rs = [r for r in rows if r["setting"] == setting]
        if not rs:
            continue
        cells = []
        for key, _ in COLUMNS:
            m, s = mean_std([r.get(key) for r in rs])
            digits = 2 if key in ("epoch_seconds", "loc_norm") else 3
            cells.append("–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}")
        lines.append(f"| {setting} ({len(rs)} seeds) | {rs[0]['beta']:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", type=Path, default=None,
                   help="only render the table of this folder's batch_norm_ablation.json")
    args = p.parse_args(argv)
    if args.report is not None:
        rows = json.loads((args.report / "batch_norm_ablation.json").read_text())
        (args.report / "batch_norm_ablation.md").write_text(markdown(rows))
        print(markdown(rows))
        return rows
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    task, budget = load_task(TASK), budget_for(TASK, quick=False)
    beta = args.beta if args.beta is not None else chosen_beta()
    rows = []
    for seed in args.seeds:
        for setting in args.settings:
            rows.append(fit_setting(task, seed, beta, budget, setting))
            r = rows[-1]
            print(f"{setting} seed {seed}: val NLL {r['val_nll']:.4f} (θ̂ "
                  f"{r['val_plugin_nll']:.4f}), test NLL {r['nll']:.4f}, acc "
                  f"{r['accuracy']:.3f}, {r['fit_seconds']:.0f} s", flush=True)
            (args.out / "batch_norm_ablation.json").write_text(json.dumps(rows, indent=1))
    (args.out / "batch_norm_ablation.md").write_text(markdown(rows))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
