"""The benchmark tasks: offline data, fixed splits, and the network of each task.

Every task is split once (``DATA_SEED``) into a *fit* set (what every method trains on), a
*validation* set carved from the training data (the one knob each method may choose is chosen
there), an in-distribution *test* set and an *OOD* set. Training seeds only change the
initialisation and the minibatch order, never the split.

- ``digits``: scikit-learn 8×8 digits (pixels / 16); classes 0–7 in distribution, every 8
  and 9 OOD; MLP 64-64-64-8 (tanh, D = 8,840).
- ``mnist1d``: MNIST-1D generated offline (5,000 × 40); classes 0–7 in, 8s and 9s OOD; a
  1-D CNN (two stride-2 convolutions, D = 6,808).
- ``diabetes``: scikit-learn diabetes (442 × 10, standardised); patients with BMI above the
  85th centile are OOD (covariate shift); MLP 10-32-32-1 (tanh, D = 1,441), Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split

from benchmarks.uq.protocol import QUICK_FIT_SIZE, QUICK_MNIST1D

DATA_SEED = 0


@dataclass
class Task:
    """One benchmark task: tensors of every split, the kind of likelihood and a network factory.

    ``x_*`` are float32 ``(N, ...)``; ``y_*`` are ``long`` class labels ``(N,)`` for
    classification and float32 standardised targets ``(N,)`` for regression."""

    name: str
    kind: str  # "classification" or "regression"
    num_outputs: int
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor
    make_net: Callable[[], nn.Module]
    y_ood: Optional[torch.Tensor] = None
    description: str = ""

    @property
    def classification(self) -> bool:
        return self.kind == "classification"

    def to(self, device) -> Task:
        """The task with every tensor, and the networks ``make_net`` builds, on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        make = self.make_net
        return replace(self, **moved, make_net=lambda: make().to(device))


def _split(x: np.ndarray, y: np.ndarray, stratify: bool):
    """75 % train / 25 % test, then 80 % fit / 20 % validation of the train part."""
    strat = y if stratify else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=strat,
                                              random_state=DATA_SEED)
    strat = y_tr if stratify else None
    x_fit, x_val, y_fit, y_val = train_test_split(x_tr, y_tr, test_size=0.2, stratify=strat,
                                                  random_state=DATA_SEED)
    return x_fit, y_fit, x_val, y_val, x_te, y_te


def _tensors(kind: str, *arrays):
    out = []
    for i, a in enumerate(arrays):
        is_label = i % 2 == 1
        if is_label and kind == "classification":
            out.append(torch.as_tensor(a, dtype=torch.long))
        else:
            out.append(torch.as_tensor(np.asarray(a), dtype=torch.float32))
    return out


class MLP(nn.Sequential):
    """Fully connected tanh network ``n_in → hidden… → n_out``; the last layer is ``Linear``."""

    def __init__(self, n_in: int, hidden: tuple, n_out: int):
        layers, width = [], n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, n_out))
        super().__init__(*layers)


class CNN1d(nn.Sequential):
    """A small 1-D CNN for MNIST-1D: input ``(N, 40)`` → two stride-2 convolutions
    (1→``channels``→``channels``, kernel 5, tanh) → ``Linear(channels·10, 32)`` → tanh →
    ``Linear(32, n_out)``."""

    def __init__(self, n_out: int, channels: int = 16, length: int = 40):
        super().__init__(
            nn.Unflatten(1, (1, length)),
            nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.Tanh(),
            nn.Conv1d(channels, channels, 5, stride=2, padding=2), nn.Tanh(),
            nn.Flatten(),
            nn.Linear(channels * (length // 4), 32), nn.Tanh(),
            nn.Linear(32, n_out),
        )


def digits_task() -> Task:
    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target
    inside = y < 8
    parts = _split(x[inside], y[inside], stratify=True)
    x_fit, y_fit, x_val, y_val, x_te, y_te, x_ood = _tensors(
        "classification", *parts, x[~inside])
    return Task("digits", "classification", 8, x_fit, y_fit, x_val, y_val, x_te, y_te, x_ood,
                make_net=lambda: MLP(64, (64, 64), 8),
                description="sklearn digits 8×8; classes 0–7 in, 8s and 9s OOD; MLP 64-64-64-8")


def mnist1d_task(num_samples: int = 5000) -> Task:
    """MNIST-1D generated offline by ``mnist1d.data.make_dataset`` (the package's default
    arguments, seed 42: the same sequences as the published data set, no download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]])
    inside = y < 8
    parts = _split(x[inside], y[inside], stratify=True)
    x_fit, y_fit, x_val, y_val, x_te, y_te, x_ood = _tensors(
        "classification", *parts, x[~inside])
    return Task("mnist1d", "classification", 8, x_fit, y_fit, x_val, y_val, x_te, y_te, x_ood,
                make_net=lambda: CNN1d(8),
                description="MNIST-1D (5,000 × 40, offline); classes 0–7 in, 8s and 9s OOD; "
                            "1-D CNN")


def diabetes_task() -> Task:
    """Diabetes progression; inputs and target standardised with the fit split's statistics.
    OOD: the patients whose BMI lies above the 85th centile (covariate shift, held out)."""
    d = load_diabetes()
    x, y = d.data.astype(np.float64), d.target.astype(np.float64)
    bmi = x[:, 2]
    inside = bmi <= np.quantile(bmi, 0.85)
    x_fit, y_fit, x_val, y_val, x_te, y_te = _split(x[inside], y[inside], stratify=False)
    mx, sx, my, sy = x_fit.mean(0), x_fit.std(0), y_fit.mean(), y_fit.std()
    nx = lambda a: (a - mx) / sx  # noqa: E731
    ny = lambda a: (a - my) / sy  # noqa: E731
    t = _tensors("regression", nx(x_fit), ny(y_fit), nx(x_val), ny(y_val), nx(x_te), ny(y_te),
                 nx(x[~inside]), ny(y[~inside]))
    return Task("diabetes", "regression", 1, *t[:7], make_net=lambda: MLP(10, (32, 32), 1),
                y_ood=t[7],
                description="sklearn diabetes (standardised); BMI > 85th centile OOD; "
                            "MLP 10-32-32-1, Gaussian likelihood with learned noise")


def load_task(name: str) -> Task:
    """Build the named task (one of ``protocol.TASKS``)."""
    return {"digits": digits_task, "mnist1d": mnist1d_task, "diabetes": diabetes_task}[name]()


def quick_task(name: str) -> Task:
    """The task of ``--quick``: at most ``QUICK_FIT_SIZE`` fit inputs (MNIST-1D generated at
    ``QUICK_MNIST1D`` sequences)."""
    task = mnist1d_task(QUICK_MNIST1D) if name == "mnist1d" else load_task(name)
    task.x_fit, task.y_fit = task.x_fit[:QUICK_FIT_SIZE], task.y_fit[:QUICK_FIT_SIZE]
    return task
