"""Batch norm in a :class:`~pyro_viking.BayesianNetwork`: evaluated on running statistics that
training keeps up to date at the point estimate (``batch_norm="running"``).

VIKING needs one fixed Jacobian row per datum: ``f(x_i; θ)`` a function of ``x_i`` and ``θ``
alone. A batch norm normalising with the statistics of its minibatch breaks that (a datum's
row depends on the other data), so with ``batch_norm="running"`` every evaluation of the
network by the model (the likelihood, the Jacobian rows, the linearisation, predictions) runs
the batch norms in eval mode, on their running statistics ``(μ, σ²)``: per channel ``c`` the
affine map ``γ_c (a_c − μ_c) / √(σ²_c + ε) + β_c``, whose ``γ, β`` are ordinary parameters
(latent or hidden as ``latent=`` says). The statistics are constants of each step: an
evaluation reads copies of them, so they can be updated while the step's graphs are alive.

The statistics of the batch norms left in *training* mode are updated once per training step,
under ``no_grad``, by one plain forward of the network in its own modes on the step's minibatch
``x_B`` at the point estimate ``θ̂``: PyTorch's update with each layer's ``momentum`` ``m``,

    μ ← (1 − m) μ + m mean_B a(x_B; θ̂),   σ² ← (1 − m) σ² + m var_B a(x_B; θ̂)   (unbiased),

(``momentum=None``: the cumulative average), so the statistics are those of the network the
posterior is centred on, and buffers of the network (saved and loaded with it). No random
number is drawn (dropout in training mode is refused). Batch norms in eval mode keep theirs.

When, and at which ``θ̂`` (:func:`step_point`): a model call is a training step when it runs
with gradients, given labels, visible to the handlers around it (no ``poutine.block`` hides it,
as the guides' own runs of the model are hidden) and not masked out (``Predictive`` masks);
the update follows the call's likelihood, so the whole step (Jacobian and likelihood) sees the
same statistics. ``θ̂`` is the mean of a VIKING posterior that the call replays from its guide
(:class:`~pyro_viking.AutoViking`; its ``loc``), else the latents the call received (the MAP
under ``AutoDelta``), averaged over a leading batch of weight samples. The fused training step
(:mod:`pyro_viking.infer.fused_step`), which does not call the model, makes the same update after
its loss: :func:`update_running_statistics` on its minibatch at the guide's mean.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK, _inspect
from torch import Tensor, nn
from torch.func import functional_call

from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.nn.hidden_parameters import hidden_values

__all__ = ["BATCH_NORM", "RUNNING", "BatchNormLayers", "is_training_step", "step_point",
           "update_after_call", "update_running_statistics"]

#: ``batch_norm=`` of :class:`~pyro_viking.BayesianNetwork`: ``None`` refuses batch norms in
#: training mode (a batch norm in eval mode runs on its fixed running statistics), ``"running"``
#: runs them on running statistics that training updates (module docstring)
RUNNING = "running"
BATCH_NORM = (None, RUNNING)
_STATISTICS = ("running_mean", "running_var")


class BatchNormLayers:
    """The batch norms of one network, under the policy ``mode`` (one of :data:`BATCH_NORM`).

    :param net: the network; its batch norms are found now (in ``named_modules`` order).
    :param mode: ``None`` or ``"running"``; ``ValueError`` otherwise.
    """

    def __init__(self, net: nn.Module, mode: Optional[str] = None) -> None:
        if mode not in BATCH_NORM:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM}, got {mode!r}")
        self.mode = mode
        self.layers: List[Tuple[str, nn.Module]] = [
            (n, m) for n, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def tracked(self) -> List[Tuple[str, nn.Module]]:
        """``(name, module)`` of the batch norms whose statistics training updates: those in
        training mode, under ``"running"`` (none otherwise)."""
        if self.mode != RUNNING:
            return []
        return [(n, m) for n, m in self.layers if m.training and m.running_mean is not None]

    @contextmanager
    def evaluating(self, params: Dict[str, Tensor]) -> Iterator[None]:
        """Within it the tracked batch norms are in eval mode, and ``params`` (the tensors the
        network is evaluated with, by ``functional_call``) holds copies of their running
        statistics (``"<module>.running_mean"``, ``"<module>.running_var"``): an update does
        not touch the tensors that the graphs of the evaluation saved."""
        tracked = self.tracked()
        params.update({_buffer_name(n, b): getattr(m, b).clone() for n, m in tracked
                       for b in _STATISTICS})
        for _, m in tracked:
            m.training = False
        try:
            yield
        finally:
            for _, m in tracked:
                m.training = True

    @torch.no_grad()
    def update(self, net: nn.Module, params: Dict[str, Tensor], x: Tensor) -> None:
        """Update the tracked statistics from the minibatch ``x`` ``(B, ...)`` with the network's
        parameters ``params`` (name → tensor, as in ``named_parameters()``): one forward of
        ``net`` in its own modes (each tracked batch norm applies its momentum in place)."""
        if self.tracked():
            functional_call(net, {n: v.detach() for n, v in params.items()}, (x,))


def _buffer_name(module: str, buffer: str) -> str:
    return f"{module}.{buffer}" if module else buffer


def is_training_step(y: Optional[Tensor]) -> bool:
    """Whether the model call running now is a training step (module docstring): labels
    ``y`` given, gradients on, not masked out and not hidden by a ``poutine.block``."""
    if y is None or not torch.is_grad_enabled():
        return False
    probe = _inspect()  # the message get_mask() reads: stopped by a hiding block
    return probe["mask"] is not False and not probe["stop"]


def _replayed_locs() -> Dict[str, Tensor]:
    """The means of the VIKING posteriors in the guide traces replayed into this call (site
    name → value): auxiliary sites whose distribution carries a ``layout`` and a ``loc``."""
    locs: Dict[str, Tensor] = {}
    for frame in _PYRO_STACK:
        trace = getattr(frame, "trace", None) if isinstance(frame, ReplayMessenger) else None
        for site in () if trace is None else trace.nodes.values():
            fn = site.get("fn")
            if site["type"] == "sample" and site["infer"].get("is_auxiliary") \
                    and isinstance(getattr(fn, "layout", None), LatentLayout) \
                    and torch.is_tensor(getattr(fn, "loc", None)):
                locs.update(fn.layout.unpack(fn.loc.detach()))
    return locs


def step_point(bnn, latent: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``θ̂`` (site name → tensor) of a training step of the :class:`~pyro_viking.BayesianNetwork`
    ``bnn`` that received the latent values ``latent`` (parameter name → ``(*batch, *shape)``):
    the replayed VIKING posterior's mean where it covers the site, else the received value; a
    leading batch averaged out, detached."""
    locs = _replayed_locs()
    point = {}
    for n, value in latent.items():
        site, shape = bnn.site_name(n), bnn.latent_shapes[n]
        v = locs.get(site, value).detach()
        point[site] = v.reshape(-1, *shape).mean(0) if v.dim() > len(shape) else v
    return point


def update_running_statistics(bnn, x: Tensor, values: Dict[str, Tensor]) -> None:
    """Update the running statistics of the batch norms in training mode of the
    :class:`~pyro_viking.BayesianNetwork` ``bnn`` (``batch_norm="running"``; nothing otherwise)
    with those of the minibatch ``x`` ``(B, ...)`` at the latent values ``values`` (site name →
    tensor, e.g. ``guide.median()``) and the current hidden parameters (module docstring)."""
    layers: BatchNormLayers = bnn.batch_norm_layers
    if not layers.tracked():
        return
    hidden = hidden_values(bnn.net, bnn.hidden_names, bnn.fit_hidden, bnn.site_name, bnn)
    latent = {n: values[bnn.site_name(n)] for n in bnn.latent_shapes}
    layers.update(bnn.net, {**hidden, **latent}, x)


def update_after_call(bnn, latent: Dict[str, Tensor], x: Tensor, y: Optional[Tensor]) -> None:
    """After a call ``bnn(x_all, y_all)`` of a :class:`~pyro_viking.BayesianNetwork` that
    evaluated the network on ``x`` (its minibatch) with the latent values ``latent`` (parameter
    name → tensor) and labels ``y``: when it is a training step and batch norms are tracked,
    :func:`update_running_statistics` at the step's :func:`step_point`."""
    if bnn.batch_norm_layers.tracked() and is_training_step(y):
        update_running_statistics(bnn, x, step_point(bnn, latent))
