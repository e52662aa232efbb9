"""Uncertainty benchmark: MAP, deep ensemble, IVON, last-layer Laplace, AutoNormal,
AutoLowRank and VIKING on offline real tasks (see README.md in this folder).

    python benchmarks/uq/run.py                       # the full run (README: run time)
    python benchmarks/uq/run.py --quick               # a smoke run (< 60 s), numbers meaningless
    python benchmarks/uq/run.py --tasks digits --methods MAP VIKING --seeds 0 1
    python benchmarks/uq/run.py --ablations           # VIKING ablations (ablations.py)
    python -m benchmarks.uq.run --quick               # the same, as a module (repository root)

Writes ``results.json`` (one object per task, method and seed), ``results.md`` (mean ± std
table), ``selection.json`` (the validation choice of each method's knob) and figures
(``<task>.png``; ``<task>_shift.png`` for a task scored under distribution shift) to ``--out``
(default: this folder).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.uq.ablations import run_ablations  # noqa: E402
from benchmarks.uq.methods import (  # noqa: E402
    fit_autolowrank,
    fit_autonormal,
    fit_ensemble,
    fit_ivon,
    fit_laplace,
    fit_map,
)
from benchmarks.uq.protocol import (  # noqa: E402
    KNOBS,
    METHODS,
    SHARES_KNOB,
    TASKS,
    budget_for,
    knob_label,
)
from benchmarks.uq.report import write_report  # noqa: E402
from benchmarks.uq.scoring import score, score_shifts  # noqa: E402
from benchmarks.uq.tasks import load_task, quick_task, task_for_seed  # noqa: E402
from benchmarks.uq.timing import run_timing  # noqa: E402
from benchmarks.uq.viking_fit import fit_viking_candidate  # noqa: E402

HERE = Path(__file__).resolve().parent
FIT = {"MAP": fit_map, "Ensemble": fit_ensemble, "IVON": fit_ivon, "Laplace": fit_laplace,
       "AutoNormal": fit_autonormal, "AutoLowRank": fit_autolowrank,
       "VIKING": fit_viking_candidate}


def _grids(args) -> dict:
    """``--grid`` as ``{method: (values...)}`` (VIKING's values are strings, others floats)."""
    out = {}
    for item in args.grid or []:
        method, values = item.split("=")
        cast = str if method == "VIKING" else float
        out[method] = tuple(cast(v) for v in values.split(","))
    return out


def select_knobs(task, methods, budget, log, grids=None) -> dict:
    """Seed 0, fit split → validation BMA NLL for every value of each method's knob.

    Returns the chosen values, the table of validation scores, and the seed-0 fits at the
    chosen values (reused for the test scores of seed 0: the same seed, data and knob)."""
    chosen, table, fits = {}, {}, {}
    for method in methods:
        if method not in KNOBS:
            continue
        name, grid, _ = KNOBS[method]
        grid = (grids or {}).get(method, grid)
        rows = []
        for value in grid:
            fitted = FIT[method](task, 0, value, budget)
            fits[(method, value)] = fitted  # seed 0 at the chosen value is this very fit
            m, _ = score(task, fitted, task.x_val, task.y_val, with_ood=False)
            rows.append({name: value, "val_nll": m["nll"], "val_accuracy": m.get("accuracy"),
                         "val_rmse": m.get("rmse")})
            log(f"  select {task.name}/{method}: {name}={knob_label(value)} val NLL "
                f"{m['nll']:.4f}")
        best = min(rows, key=lambda r: r["val_nll"] if math.isfinite(r["val_nll"]) else math.inf)
        chosen[method] = best[name]
        table[method] = {"knob": name, "chosen": best[name], "grid": rows}
    return chosen, table, {m: fits[(m, v)] for m, v in chosen.items()}


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny budgets, one seed, no selection")
    p.add_argument("--no-select", action="store_true", help="use the default knobs")
    p.add_argument("--grid", nargs="+", default=None, metavar="METHOD=V1,V2",
                   help="choose among these knob values only (e.g. a share of a method's grid "
                        "per process; the shares' selection.json are merged by report.py)")
    p.add_argument("--ablations", action="store_true", help="run the VIKING ablations instead")
    p.add_argument("--timing", action="store_true",
                   help="only time one epoch per method, interleaved (timing.json)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu",
                   help="where --timing runs every method (e.g. cuda); the main run is CPU")
    p.add_argument("--ablation-beta", type=float, default=None,
                   help="β of the ablations (default: the validation choice, else 0.03)")
    p.add_argument("--ablation-only", nargs="+", default=None,
                   help="run only these ablations (names of ablations.ABLATIONS)")
    p.add_argument("--ablation-epochs", type=int, default=None,
                   help="epochs of the ablations (default: the main run's)")
    args = p.parse_args(argv)
    if args.device != "cpu" and not args.timing:
        p.error(f"--device {args.device} applies to --timing only (the main run and the "
                "ablations run on the CPU)")
    return args


def main(argv=None) -> list:
    """Run what the arguments ask (the main run, ``--ablations`` or ``--timing``) and return
    its rows (``--timing``: the per-task timings)."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ablations:
        return run_ablations(args)
    if args.timing:
        return run_timing(args)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    results, selection = [], {}
    for task_name in args.tasks:
        run_task(task_name, args, seeds, selection, results)
    write_report(results, args.out, selection)
    return results


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_task(task_name: str, args, seeds, selection: dict, results: list) -> None:
    """Every method and seed on one task (knobs chosen on seed 0's validation split unless
    ``--quick`` / ``--no-select``, into ``selection``): each row appended to ``results`` and
    written to ``--out`` at once."""
    task = quick_task(task_name) if args.quick else load_task(task_name)
    budget = budget_for(task_name, args.quick)
    _log(f"{task_name}: fit {len(task.x_fit)}, val {len(task.x_val)}, test "
         f"{len(task.x_test)}, OOD {len(task.x_ood)}; {budget}")
    chosen, reuse = {m: KNOBS[m][2] for m in KNOBS}, {}
    grids = _grids(args)
    if grids and 0 not in seeds and set(grids) >= set(args.methods) \
            and all(len(g) == 1 for g in grids.values()):
        chosen.update({m: g[0] for m, g in grids.items()})  # seeds past 0 at a chosen value
    elif not (args.quick or args.no_select):
        picked, selection[task_name], reuse = select_knobs(task, args.methods, budget, _log,
                                                           grids)
        chosen.update(picked)
    for seed in seeds:
        seeded = task_for_seed(task, seed, args.quick)  # the regression tasks: its own split
        for method in args.methods:
            knob = chosen[SHARES_KNOB.get(method, method)]
            if seed == 0 and method in reuse:
                fitted = reuse.pop(method)
            else:
                fitted = FIT[method](seeded, seed, knob, budget)
            results.append(result_row(seeded, method, seed, knob, budget, fitted))
            _write(args.out, results, selection)


def result_row(task, method: str, seed: int, knob: float, budget, fitted) -> dict:
    """One row of ``results.json``: test (+ OOD) metrics, timings, the knob, the fit's scalar
    extras and, for a task with distribution shifts, the metrics per shift strength."""
    m, secs = score(task, fitted, task.x_test, task.y_test, with_ood=True)
    row = {"task": task.name, "method": method, "seed": seed, **m,
           "epoch_seconds": fitted.epoch_seconds, "predict_seconds": secs,
           "epochs": budget.epochs, "knob": knob, "split_seed": task.split_seed,
           **{k: v for k, v in fitted.info.items() if isinstance(v, (int, float))}}
    shifts = score_shifts(task, fitted)
    if shifts is not None:
        row["shift"] = shifts
    _log(f"  {task.name}/{method} seed {seed}: NLL {m['nll']:.4f} acc {m.get('accuracy')} "
         f"{fitted.epoch_seconds:.3f} s/epoch")
    return row


def _write(out: Path, results: list, selection: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if selection:
        (out / "selection.json").write_text(json.dumps(selection, indent=1))


if __name__ == "__main__":
    main()
