"""What one benchmark task is (:class:`Task`: the tensors of every split, the likelihood, a
network factory, the distribution shifts it is scored under) and the splitting helpers shared
by the task builders (``classification_tasks.py``, ``regression_tasks.py``)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from sklearn.model_selection import train_test_split


@dataclass
class Task:
    """One benchmark task: tensors of every split, the kind of likelihood and a network factory.

    ``x_*`` are float32 ``(N, ...)``; ``y_*`` are ``long`` class labels ``(N,)`` for
    classification and float32 standardised targets ``(N,)`` for regression. ``shifts`` are
    the strengths (positions) of the circular shifts of the test inputs along their last axis
    that the task is also scored on (``shifted``); ``split_seed`` is the seed of the split."""

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
    shifts: Tuple[int, ...] = ()
    split_seed: int = 0

    @property
    def classification(self) -> bool:
        return self.kind == "classification"

    def shifted(self, strength: int) -> torch.Tensor:
        """The test inputs rolled circularly by ``strength`` positions along the last axis
        (``torch.roll``; the labels are ``y_test``)."""
        return torch.roll(self.x_test, shifts=strength, dims=-1)

    def to(self, device) -> Task:
        """The task with every tensor, and the networks ``make_net`` builds, on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        make = self.make_net
        return replace(self, **moved, make_net=lambda: make().to(device))


def split(x: np.ndarray, y: np.ndarray, stratify: bool, seed: int, test_size: float,
          val_size: float = 0.2):
    """``test_size`` of the data to test, then ``val_size`` of the rest to validation
    (stratified by ``y`` for classification). Returns (x_fit, y_fit, x_val, y_val, x_test,
    y_test)."""
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size,
                                              stratify=y if stratify else None,
                                              random_state=seed)
    x_fit, y_fit, x_val, y_val = fit_val_split(x_tr, y_tr, stratify, seed, val_size)
    return x_fit, y_fit, x_val, y_val, x_te, y_te


def fit_val_split(x: np.ndarray, y: np.ndarray, stratify: bool, seed: int,
                  val_size: float = 0.2):
    """``val_size`` of the training data to validation. Returns (x_fit, y_fit, x_val, y_val)."""
    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=val_size, stratify=y if stratify else None, random_state=seed)
    return x_fit, y_fit, x_val, y_val


def tensors(kind: str, *arrays):
    """Arrays (inputs, labels, inputs, labels, …) as tensors: inputs float32; labels ``long``
    for classification, float32 for regression."""
    out = []
    for i, a in enumerate(arrays):
        is_label = i % 2 == 1
        if is_label and kind == "classification":
            out.append(torch.as_tensor(a, dtype=torch.long))
        else:
            out.append(torch.as_tensor(np.asarray(a), dtype=torch.float32))
    return out
