"""The uncertainty benchmark's protocol: tasks, methods, the knob each method may choose on the
validation split, and the training budget of each task (full run and ``--quick``).

Every entry point (``run.py``, ``ablations.py``, ``timing.py``, ``diagnose.py``) reads these
from here; the README's protocol section describes the same values. Pure Python: the report
(``report.py``) imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

TASKS = ("digits", "digits_resnet", "mnist1d", "diabetes", "boston", "concrete")
#: tasks split anew for every seed (repeated random splits, the UCI protocol); the others
#: have one fixed split
RESPLIT_TASKS = ("diabetes", "boston", "concrete")
#: circular shifts (positions, ``torch.roll`` along the sequence) of the test inputs each task
#: is also scored on; 0 is the test set itself
SHIFTS: Dict[str, Tuple[int, ...]] = {"mnist1d": (0, 2, 4, 8, 12)}
METHODS = ("MAP", "Ensemble", "IVON", "Laplace", "AutoNormal", "AutoLowRank", "VIKING")

#: The one knob each method may choose on the validation split (seed 0, best BMA NLL), eight
#: candidates each (VIKING's eight are ``select_beta``'s defaults):
#: method → (knob name, grid, the value used without selection: ``--no-select``, ``--quick``).
#: VIKING's knob is the candidate of ``pyro_viking.select_beta`` with its defaults: a recipe
#: (``"elbo"``: warm-up + full ELBO; ``"post-hoc"``: a MAP of the whole budget + curvature scales)
#: at a KL weight of ``DEFAULT_BETA_GRID`` (1, 0.1, 0.01, 0.001), written ``"recipe@β"``.
VIKING_CANDIDATES = tuple(f"{r}@{b:g}" for r in ("elbo", "post-hoc")
                          for b in (1.0, 0.1, 0.01, 0.001))
KNOBS: Dict[str, Tuple[str, tuple, object]] = {
    "MAP": ("prior_scale", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0), 1.0),
    "IVON": ("hess_init", (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), 1.0),
    "AutoNormal": ("prior_scale", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0), 0.3),
    "AutoLowRank": ("prior_scale", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0), 0.3),
    "VIKING": ("recipe@beta", VIKING_CANDIDATES, "elbo@0.001"),
}


def viking_knob(value) -> Tuple[str, float]:
    """``(recipe, β)`` of a VIKING knob value: ``"recipe@β"``, or a bare β (the full ELBO)."""
    if isinstance(value, str) and "@" in value:
        recipe, beta = value.split("@")
        return recipe, float(beta)
    return "elbo", float(value)


def knob_label(value) -> str:
    """A knob value as the report prints it."""
    return value if isinstance(value, str) else f"{value:g}"


#: Ensemble and Laplace reuse the MAP's prior scale (Laplace's own prior precision is fitted by
#: its marginal likelihood).
SHARES_KNOB = {"Ensemble": "MAP", "Laplace": "MAP"}

#: Epochs per task (passes over the fit split) for the full run and for ``--quick``; the full
#: run's are where MAP's validation NLL has plateaued (``learning_curves.py``, README).
EPOCHS = {"digits": 60, "digits_resnet": 60, "mnist1d": 200, "diabetes": 50, "boston": 150,
          "concrete": 150}
QUICK_EPOCHS = {"digits": 2, "digits_resnet": 2, "mnist1d": 1, "diabetes": 2, "boston": 2,
                "concrete": 2}
#: minibatch size of the full run (every method); the small regression tasks use 32
BATCH_SIZE = {"digits": 64, "digits_resnet": 64, "mnist1d": 64, "diabetes": 32, "boston": 32,
              "concrete": 32}
#: ``--quick``: at most this many fit inputs (MNIST-1D generated at ``QUICK_MNIST1D`` sequences).
QUICK_FIT_SIZE = 300
QUICK_MNIST1D = 1000


@dataclass
class Budget:
    """Sizes shared by every method of a task (see the README for the values used)."""

    epochs: int
    batch_size: int = 64
    lr: float = 3e-3  # Adam, for MAP, the ensemble members and every Pyro guide
    num_samples: int = 100  # posterior samples per prediction
    ensemble_size: int = 5
    ivon_lr: float = 0.1  # ivon-opt's README value
    guide_init_scale: float = 1e-2  # AutoNormal / AutoLowRank initial std
    particles: int = 1  # sequential particles of every Pyro guide (each its own minibatch)


def budget_for(task: str, quick: bool) -> Budget:
    """The task's budget: ``EPOCHS`` with minibatches of ``BATCH_SIZE``, or under ``quick``
    ``QUICK_EPOCHS`` with 4 posterior samples and 2 ensemble members."""
    if quick:
        return Budget(epochs=QUICK_EPOCHS[task], num_samples=4, ensemble_size=2)
    return Budget(epochs=EPOCHS[task], batch_size=BATCH_SIZE[task])
