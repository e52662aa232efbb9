"""VIKING on a network with batch norms in training mode (the ``digits_resnet`` task): the MAP
warm-up trained as ordinary PyTorch, then the recipe with the batch norms on fixed statistics.

A batch norm that normalises with its minibatch's statistics gives no per-datum Jacobian row,
so VIKING must evaluate it on running statistics. Training a network from scratch that way is
slow (the gradient does not see the normalisation; ``docs/recipe.md``), so the warm-up part of
the budget (``viking_fit.phase_epochs``; the whole budget for the post-hoc recipe) is the MAP as
PyTorch trains a ResNet, batch norms in training mode (:func:`pytorch_warmup`:
``methods.train_map``), at the objective of ``fit_viking``'s own tempered warm-up: mean NLL +
β ‖θ‖² / (2 s₀² N), s₀ the learned prior scale's start (e⁻²), i.e. MAP under the prior scale
s₀ / √β. Its weights and running statistics are copied into the model, whose ``fit_viking``
starts from them (``map_values=``, no warm-up steps) for the rest of the budget. The data budget
is unchanged: the warm-up epochs are counted once, in PyTorch instead of Pyro.

What the ELBO phase does with the statistics (:data:`STATISTICS`):

- ``"frozen"`` (the benchmark's choice): the batch norms are put in eval mode after the
  warm-up, affine layers on the MAP's running statistics for the rest of the fit;
- ``"running"``: ``BayesianNetwork(batch_norm="running")`` keeps updating them once per step at
  θ̂. Measured on ``digits_resnet`` (README): the weights' norm and the learned prior scale grow
  step after step and the mean network degrades (seed 0, β = 0.001: validation NLL of θ̂ 0.069
  after the warm-up, 0.67 after the 770 ELBO steps, against 0.005 frozen); a plain MAP
  continued under ``"running"`` drifts the same way, more slowly.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from benchmarks.uq.methods import train_map
from benchmarks.uq.protocol import Budget
from benchmarks.uq.pyro_models import INIT_PRIOR_SCALE
from benchmarks.uq.task_data import Task

__all__ = ["STATISTICS", "batch_norm_mode", "pytorch_warmup"]

#: what the batch norms do after the warm-up (module docstring): ``"frozen"`` or ``"running"``
STATISTICS = "frozen"


def batch_norm_mode(net: nn.Module) -> Optional[str]:
    """``BayesianNetwork(batch_norm=...)`` for ``net``: ``"running"`` when it has a batch norm in
    training mode, else ``None`` (the library's default, which refuses one)."""
    training = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                   for m in net.modules())
    return "running" if training else None


def pytorch_warmup(bnn, task: Task, seed: int, beta: float, budget: Budget, epochs: int,
                   statistics: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], float]:
    """Train the seed's network as PyTorch MAP (batch norms in training mode) for ``epochs``
    passes at the β-tempered warm-up objective (module docstring), and copy its weights and
    running statistics into the :class:`~pyro_viking.BayesianNetwork` ``bnn`` (built with
    ``batch_norm="running"`` on the same seed's initialisation); ``statistics`` (default
    :data:`STATISTICS`) ``"frozen"`` then puts its batch norms in eval mode. Returns the MAP by
    site name (``fit_viking(map_values=)``) and the seconds it took."""
    statistics = statistics or STATISTICS
    if statistics not in ("frozen", "running"):
        raise ValueError(f"statistics must be 'frozen' or 'running', got {statistics!r}")
    start = time.perf_counter()
    net, _, _ = train_map(task, seed, INIT_PRIOR_SCALE / math.sqrt(beta),
                          replace(budget, epochs=epochs))
    bnn.net.load_state_dict(net.state_dict())  # parameters and running statistics
    if statistics == "frozen":
        for m in bnn.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    values = {bnn.site_name(n): p.detach().clone() for n, p in bnn.net.named_parameters()
              if n in bnn.latent_shapes}
    return values, time.perf_counter() - start
