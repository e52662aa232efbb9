"""The compared methods. Each ``fit_<method>(task, seed, knob, budget)`` trains on the task's
fit split and returns a :class:`Fitted`, whose ``sample(x)`` gives S sampled predictions.

Equal data budget: every method sees ``budget.epochs × N_fit`` training examples (an *epoch* is
one pass over the fit split). Pyro's sequential particles each draw their own minibatch, so a
Pyro method with K particles takes ``⌈N / (K·B)⌉`` steps per epoch (K = 1 by default: one
minibatch of B per step, as for MAP and IVON). The deep ensemble is the exception by design: each
of its 5 members gets the full budget (5× the examples and compute, reported as such).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import pyro
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_value
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.uq.protocol import Budget
from benchmarks.uq.pyro_models import PyroBNN, init_values
from benchmarks.uq.tasks import Task


@dataclass
class Fitted:
    """A trained method: ``sample(x)`` → probs (S, N, C) or regression means (S, N)."""

    sample: Callable[[torch.Tensor], torch.Tensor]
    epoch_seconds: float
    noise: Optional[float] = None  # regression noise scale
    info: Dict[str, float] = field(default_factory=dict)


def _seed(seed: int) -> None:
    pyro.set_rng_seed(seed)  # seeds torch, random and numpy
    pyro.clear_param_store()


def _new_net(task: Task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return task.make_net()


def _nll(task: Task, out: torch.Tensor, y: torch.Tensor, log_noise) -> torch.Tensor:
    """Mean negative log-likelihood of a minibatch (cross-entropy or Gaussian)."""
    if task.classification:
        return F.cross_entropy(out, y)
    return -torch.distributions.Normal(out.squeeze(-1), log_noise.exp()).log_prob(y).mean()


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def train_map(task: Task, seed: int, prior_scale: float, budget: Budget,
              on_epoch: Optional[Callable[[int, nn.Module, torch.Tensor], None]] = None):
    """Adam on the mean NLL + ‖θ‖² / (2 s² N) (MAP under the prior N(0, s² I)).

    ``on_epoch(epoch, net, log_noise)`` runs after every epoch (1-based; e.g. a learning
    curve's evaluation), outside the timed training. Returns (net, log_noise, seconds of
    training). ``log_noise`` is a learned scalar for regression."""
    net = _new_net(task, seed)
    log_noise = nn.Parameter(torch.tensor(math.log(0.5), device=task.x_fit.device))
    params = list(net.parameters()) + ([] if task.classification else [log_noise])
    opt = torch.optim.Adam(params, lr=budget.lr)
    n = len(task.x_fit)
    decay = 1.0 / (2.0 * prior_scale ** 2 * n)
    gen = torch.Generator().manual_seed(seed)
    secs = 0.0
    for epoch in range(budget.epochs):
        start = time.perf_counter()
        for idx in _batches(n, budget.batch_size, gen):
            opt.zero_grad()
            loss = _nll(task, net(task.x_fit[idx]), task.y_fit[idx], log_noise)
            loss = loss + decay * sum((p ** 2).sum() for p in net.parameters())
            loss.backward()
            opt.step()
        secs += time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch + 1, net, log_noise)
    return net, log_noise, secs


def _point_sampler(task: Task, nets):
    def sample(x):  # eval mode: batch norms on their running statistics
        for net in nets:
            net.eval()
        with torch.no_grad():
            outs = [net(x) for net in nets]
        if task.classification:
            return torch.stack([o.softmax(-1) for o in outs])
        return torch.stack([o.squeeze(-1) for o in outs])
    return sample


def fit_map(task: Task, seed: int, prior_scale: float, budget: Budget,
            on_epoch: Optional[Callable[[int, nn.Module, torch.Tensor], None]] = None) -> Fitted:
    """MAP (:func:`train_map`); ``sample(x)`` is the single network's prediction."""
    net, log_noise, secs = train_map(task, seed, prior_scale, budget, on_epoch)
    return Fitted(_point_sampler(task, [net]), secs / budget.epochs,
                  noise=float(log_noise.detach().exp()), info={"net": net, "log_noise": log_noise})


def fit_ensemble(task: Task, seed: int, prior_scale: float, budget: Budget) -> Fitted:
    """``budget.ensemble_size`` MAP nets from different initialisations and batch orders
    (seeds 1000·seed + m); the regression noise is the root mean of their noise variances."""
    members = [train_map(task, 1000 * seed + m, prior_scale, budget)
               for m in range(budget.ensemble_size)]
    secs = sum(m[2] for m in members)
    noise = float(torch.stack([m[1].detach().exp() ** 2 for m in members]).mean().sqrt())
    return Fitted(_point_sampler(task, [m[0] for m in members]), secs / budget.epochs,
                  noise=noise)


def fit_ivon(task: Task, seed: int, hess_init: float, budget: Budget) -> Fitted:
    """ivon-opt at its README settings (lr 0.1, ess = N, one MC sample per step, the
    optimiser's other defaults); the one knob is the initial Hessian h0 (``hess_init``)."""
    import ivon

    net = _new_net(task, seed)
    log_noise = nn.Parameter(torch.tensor(math.log(0.5), device=task.x_fit.device))
    params = list(net.parameters()) + ([] if task.classification else [log_noise])
    n = len(task.x_fit)
    opt = ivon.IVON(params, lr=budget.ivon_lr, ess=n, hess_init=hess_init)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(budget.epochs):
        for idx in _batches(n, budget.batch_size, gen):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss = _nll(task, net(task.x_fit[idx]), task.y_fit[idx], log_noise)
                loss.backward()
            opt.step()
    secs = time.perf_counter() - start

    def sample(x):
        outs = []
        net.eval()  # batch norms on the running statistics kept at the sampled weights
        with torch.no_grad():
            for _ in range(budget.num_samples):
                with opt.sampled_params():
                    out = net(x)
                outs.append(out.softmax(-1) if task.classification else out.squeeze(-1))
        return torch.stack(outs)

    return Fitted(sample, secs / budget.epochs, noise=float(log_noise.detach().exp()))


def fit_laplace(task: Task, seed: int, prior_scale: float, budget: Budget) -> Fitted:
    """laplace-torch on the MAP net: ``Laplace(net, likelihood, subset_of_weights="last_layer",
    hessian_structure="kron")``, ``fit``, ``optimize_prior_precision(method="marglik")``; GLM
    predictive (classification: ``link_approx="probit"`` for the BMA is its default; here the
    S samples of ``predictive_samples`` are used for every metric, so that all methods are
    scored the same way). The MAP's prior scale is the MAP's chosen knob."""
    from laplace import Laplace  # optional: the benchmark's extra packages (setup.sh)

    net, log_noise, secs = train_map(task, seed, prior_scale, budget)
    start = time.perf_counter()
    if task.classification:
        la = Laplace(net, "classification", subset_of_weights="last_layer",
                     hessian_structure="kron")
        data = TensorDataset(task.x_fit, task.y_fit)
    else:
        la = Laplace(net, "regression", subset_of_weights="last_layer",
                     hessian_structure="kron", sigma_noise=float(log_noise.detach().exp()))
        data = TensorDataset(task.x_fit, task.y_fit.unsqueeze(-1))
    la.fit(DataLoader(data, batch_size=budget.batch_size))
    la.optimize_prior_precision(method="marglik")
    secs += time.perf_counter() - start

    def sample(x):
        with torch.no_grad():
            if task.classification:
                return la.predictive_samples(x, pred_type="glm", n_samples=budget.num_samples)
            f_mu, f_var = la(x, pred_type="glm")
            std = f_var.reshape(len(x)).clamp_min(0).sqrt()
            eps = torch.randn(budget.num_samples, len(x))
            return f_mu.reshape(len(x)) + std * eps

    info = {"prior_precision": float(la.prior_precision.mean())}
    return Fitted(sample, secs / budget.epochs, noise=float(log_noise.detach().exp()), info=info)


def run_svi(model, guide, loss, task: Task, epochs: int, budget: Budget, optim=None,
            on_epoch=None, particles: int = 1):
    """SVI on the fit split for ``epochs`` passes: ⌈N / (particles·B)⌉ steps per epoch.
    Returns the mean loss per epoch."""
    svi = SVI(model, guide, optim or pyro.optim.Adam({"lr": budget.lr}), loss)
    steps = math.ceil(len(task.x_fit) / (budget.batch_size * particles))
    losses = []
    for _ in range(epochs):
        losses.append(sum(svi.step(task.x_fit, task.y_fit, budget.batch_size)
                          for _ in range(steps)) / steps)
        if on_epoch is not None:
            on_epoch()
    return losses


def pyro_sampler(task: Task, model, guide, num_samples: int, site: Optional[str] = None):
    """S samples of the model's ``site`` (default ``probs`` / ``mean``) under ``guide``:
    ``(S, N, C)`` for classification, ``(S, N)`` for regression."""
    site = site or ("probs" if task.classification else "mean")

    def sample(x):
        with torch.no_grad():
            out = Predictive(model, guide=guide, num_samples=num_samples,
                             return_sites=[site])(x)[site]
        return out.reshape(num_samples, len(x), -1) if task.classification else \
            out.reshape(num_samples, len(x))
    return sample


def _noise() -> Optional[float]:
    store = pyro.get_param_store()
    return float(store["noise_scale"].detach()) if "noise_scale" in store else None


def _fit_gaussian_guide(guide_cls, task, seed, prior_scale, budget, **guide_kwargs) -> Fitted:
    _seed(seed)
    model = PyroBNN(_new_net(task, seed), task.kind, prior_scale)
    guide = guide_cls(model, init_loc_fn=init_to_value(values=init_values(model)),
                      init_scale=budget.guide_init_scale, **guide_kwargs)
    loss = Trace_ELBO(num_particles=budget.particles)
    start = time.perf_counter()
    losses = run_svi(model, guide, loss, task, budget.epochs, budget, particles=budget.particles)
    secs = time.perf_counter() - start
    model.eval()  # predictions: batch norms on their running statistics (none elsewhere)
    return Fitted(pyro_sampler(task, model, guide, budget.num_samples), secs / budget.epochs,
                  noise=_noise(), info={"final_loss": losses[-1]})


def fit_autonormal(task: Task, seed: int, prior_scale: float, budget: Budget) -> Fitted:
    """Pyro ``AutoNormal`` (mean field), ``Trace_ELBO`` (β = 1); knob: the prior scale s."""
    return _fit_gaussian_guide(AutoNormal, task, seed, prior_scale, budget)


def fit_autolowrank(task: Task, seed: int, prior_scale: float, budget: Budget) -> Fitted:
    """Pyro ``AutoLowRankMultivariateNormal`` at its default rank (⌈√D⌉); knob: prior scale."""
    return _fit_gaussian_guide(AutoLowRankMultivariateNormal, task, seed, prior_scale, budget)
