"""The classification tasks (offline data; classes 8 and 9 held out as the OOD set).

- ``digits``: scikit-learn 8×8 digits (pixels / 16); classes 0–7 in distribution, every 8
  and 9 OOD; 75 % train / 25 % test, 80 % fit / 20 % validation of the train part (stratified,
  ``DATA_SEED``); MLP 64-64-64-8 (tanh).
- ``mnist1d``: MNIST-1D at its standard size, generated offline by ``mnist1d.data.make_dataset``
  with the package's default arguments (5,000 sequences of length 40, seed 42: the package's
  4,000 train / 1,000 test split). Classes 0–7 in distribution: the package's test split is the
  test set, its train split gives 80 % fit / 20 % validation (stratified, ``DATA_SEED``); the 8s
  and 9s of both splits (never trained on) are the OOD set. Network: the authors' 1-D CNN
  (``networks.CNN1d``, 32 channels). Also scored on its test sequences rolled circularly by
  ``protocol.SHIFTS["mnist1d"]`` positions.
- ``digits_resnet``: the ``digits`` task (the same data and splits) with a residual CNN with
  batch norm (``networks.SmallResNet``, 16 channels) on the 8×8 images.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.datasets import load_digits

from benchmarks.uq.networks import MLP, CNN1d, SmallResNet
from benchmarks.uq.protocol import SHIFTS
from benchmarks.uq.task_data import Task, fit_val_split, split, tensors

DATA_SEED = 0
IN_CLASSES = 8  # classes 0…7 in distribution, the rest OOD
MNIST1D_CHANNELS = 32
RESNET_CHANNELS = 16


def digits_task() -> Task:
    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target
    inside = y < IN_CLASSES
    parts = split(x[inside], y[inside], stratify=True, seed=DATA_SEED, test_size=0.25)
    x_fit, y_fit, x_val, y_val, x_te, y_te, x_ood = tensors(
        "classification", *parts, x[~inside])
    return Task("digits", "classification", IN_CLASSES, x_fit, y_fit, x_val, y_val, x_te, y_te,
                x_ood, make_net=lambda: MLP(64, (64, 64), IN_CLASSES),
                description="sklearn digits 8×8; classes 0–7 in, 8s and 9s OOD; MLP 64-64-64-8")


def digits_resnet_task() -> Task:
    """``digits`` (the same tensors and split) with ``SmallResNet`` (batch norm) on the images."""
    return replace(digits_task(), name="digits_resnet",
                   make_net=lambda: SmallResNet(IN_CLASSES, RESNET_CHANNELS),
                   description="sklearn digits 8×8; classes 0–7 in, 8s and 9s OOD; residual CNN "
                               f"with batch norm ({RESNET_CHANNELS} channels)")


def mnist1d_arrays(num_samples: int = 5000):
    """``(x_train, y_train, x_test, y_test)`` of ``mnist1d.data.make_dataset`` at the
    package's default arguments (``num_samples`` 5,000: the published data set, no download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)
    return (data["x"].astype(np.float32), np.asarray(data["y"]),
            data["x_test"].astype(np.float32), np.asarray(data["y_test"]))


def mnist1d_task(num_samples: int = 5000) -> Task:
    """MNIST-1D at the package's split (see the module docstring); OOD = every 8 and 9."""
    x_tr, y_tr, x_te, y_te = mnist1d_arrays(num_samples)
    in_tr, in_te = y_tr < IN_CLASSES, y_te < IN_CLASSES
    x_fit, y_fit, x_val, y_val = fit_val_split(x_tr[in_tr], y_tr[in_tr], True, DATA_SEED)
    x_ood = np.concatenate([x_tr[~in_tr], x_te[~in_te]])
    x_fit, y_fit, x_val, y_val, x_te, y_te, x_ood = tensors(
        "classification", x_fit, y_fit, x_val, y_val, x_te[in_te], y_te[in_te], x_ood)
    return Task("mnist1d", "classification", IN_CLASSES, x_fit, y_fit, x_val, y_val, x_te, y_te,
                x_ood, make_net=lambda: CNN1d(IN_CLASSES, MNIST1D_CHANNELS),
                description=f"MNIST-1D ({num_samples:,} × 40, the package's train/test split); "
                            "classes 0–7 in, 8s and 9s OOD; the authors' 1-D CNN "
                            f"({MNIST1D_CHANNELS} channels, ReLU)",
                shifts=SHIFTS["mnist1d"])
