"""The VIKING fit used by the benchmark, behind one function (:func:`fit_viking`).

What a user of the README writes: the task's network as a
:class:`~pyro_viking.BayesianNetwork` (prior ``N(0, s²I)`` with the scale ``s`` a learned
``pyro.param``, started at the paper's e⁻²; regression: a learned noise scale, started at 0.5
as for every other method), fitted by the library recipe :func:`pyro_viking.fit_viking`:

1. MAP warm-up (``AutoDelta``, prior scale held) for ``warmup`` epochs (default 1/12 of the
   budget, the paper's 5 of 60);
2. σ_im and the prior scale (= σ_ker) from curvature at the MAP (no steps);
3. the full ELBO, ``TraceViking_ELBO(beta)``, for the rest of the budget.

Prediction: ``guide.project_training_data`` projects S fresh samples on the kernel of the whole
fit split's Jacobian (counted in the prediction seconds), then ``Predictive``.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import pyro

from benchmarks.uq.batch_norm_fit import batch_norm_mode, pytorch_warmup
from benchmarks.uq.methods import Fitted, _new_net, _seed, pyro_sampler
from benchmarks.uq.protocol import Budget, viking_knob
from benchmarks.uq.pyro_models import INIT_PRIOR_SCALE
from benchmarks.uq.tasks import Task
from pyro_viking import AutoViking, BayesianNetwork
from pyro_viking.infer.recipe.fit import fit_viking as recipe_fit_viking
from pyro_viking.infer.recipe.warmup import fit_map

#: AutoViking options of the benchmark (the library's defaults, spelled out for the ablations)
DEFAULT_OPTIONS = dict(jacobian="loss", grad_through_projection=False)
DEFAULT_GAMMA = 0.5
INIT_NOISE_SCALE = 0.5  # every method's regression noise starts here (methods.py)


def phase_epochs(epochs: int, warmup: Optional[int] = None):
    """(warm-up, full ELBO) epochs: 1/12 of the budget (the paper's 5 of 60) and the rest."""
    w = max(1, round(epochs / 12)) if warmup is None else warmup
    return w, max(1, epochs - w)


def make_bnn(task: Task, seed: int, batch_size: int) -> BayesianNetwork:
    """The task's network (the seed's PyTorch initialisation) as the benchmark's VIKING model
    (batch norms in training mode: on running statistics, ``batch_norm_fit.py``)."""
    kind = "classification" if task.classification else "regression"
    net = _new_net(task, seed)
    return BayesianNetwork(net, kind, prior_scale="learned",
                           init_prior_scale=INIT_PRIOR_SCALE, noise_scale="learned",
                           init_noise_scale=INIT_NOISE_SCALE, batch_size=batch_size,
                           batch_norm=batch_norm_mode(net))


def fit_viking(task: Task, seed: int, beta: float, budget: Budget, *,
               warmup: Optional[int] = None, particles: Optional[int] = None,
               batch_size: Optional[int] = None, gamma: float = DEFAULT_GAMMA,
               kernel_scale: str = "prior", final_lr: Optional[float] = None,
               post_hoc: bool = False, predictive: str = "sampled",
               scales_epochs: int = 0, mean_lr_factor: float = 1.0,
               **viking_options) -> Fitted:
    """Fit VIKING on the task's fit split (β is the one knob chosen on validation).

    ``viking_options`` override :data:`DEFAULT_OPTIONS` (AutoViking arguments); ``particles``
    and ``batch_size`` override the budget's (the data budget stays ``epochs × N``: K
    sequential particles each draw their own minibatch, so a step consumes K·B examples).
    ``post_hoc``: the whole budget is MAP warm-up, then the curvature scales and no ELBO step
    (``fit_viking(num_steps=0)``). ``predictive``: ``"sampled"`` (the network at posterior
    samples) or ``"linearised"`` (the GLM predictive, ``bnn.linearised(guide)``).
    ``scales_epochs`` (with ``post_hoc``): the last ``scales_epochs`` of the budget train σ_im and
    the prior scale by the ELBO with θ̂ frozen at the MAP of the rest (the paper's σ-only phase).
    ``mean_lr_factor``: the ELBO phase's learning rate of θ̂ is the budget's times this factor
    (the scales keep the budget's)."""
    K = particles or budget.particles
    B = batch_size or budget.batch_size
    _seed(seed)
    bnn = make_bnn(task, seed, B)
    w, _ = phase_epochs(budget.epochs, warmup)
    per_epoch = math.ceil(len(task.x_fit) / B)
    options = {**DEFAULT_OPTIONS, **viking_options}
    num_steps = max(1, (budget.epochs - w) * per_epoch // K)
    scales_steps = 0
    if post_hoc:
        w, num_steps = budget.epochs - scales_epochs, 0
        scales_steps = scales_epochs * per_epoch // K
    optim = pyro.optim.Adam({"lr": budget.lr})
    map_values, scales_lr_factor = None, None
    warmup_secs = 0.0
    if bnn.batch_norm:  # batch norms in training mode: the warm-up as PyTorch MAP
        map_values, warmup_secs = pytorch_warmup(bnn, task, seed, beta, budget, w)
    if mean_lr_factor != 1.0:  # the warm-up at the budget's rate, then θ̂ slower than the scales
        map_values = fit_map(bnn, task.x_fit, task.y_fit, num_steps=w * per_epoch, optim=optim,
                             prior_scale_param=bnn.prior_scale_name, prior_weight=beta,
                             progress=False)
        optim = pyro.optim.Adam({"lr": budget.lr * mean_lr_factor})
        scales_lr_factor = 1.0 / mean_lr_factor
    if final_lr is not None:
        lrd = (final_lr / budget.lr) ** (1 / num_steps)
        optim = pyro.optim.ClippedAdam({"lr": budget.lr, "lrd": lrd, "clip_norm": 1e12})
    start = time.perf_counter()
    fit = recipe_fit_viking(
        bnn, task.x_fit, task.y_fit,
        num_steps=num_steps, warmup_steps=None if map_values else w * per_epoch, beta=beta,
        optim=optim, num_particles=K, gamma=gamma, guide_options=options, progress=False,
        kernel_scale=kernel_scale, scales_steps=scales_steps, map_values=map_values,
        scales_lr_factor=scales_lr_factor)
    secs = time.perf_counter() - start + warmup_secs
    return _fitted(task, bnn, fit.guide, budget, secs, predictive=predictive, beta=beta,
                   prior_scale=float(pyro.param(bnn.prior_scale_name).detach()),
                   init_sigma_im=float(fit.init["image_scale"]))


def fit_viking_candidate(task: Task, seed: int, knob, budget: Budget) -> Fitted:
    """The benchmark's VIKING at one candidate of its knob, ``"recipe@β"``
    (``protocol.VIKING_CANDIDATES``, ``select_beta``'s defaults): ``"elbo"`` is
    :func:`fit_viking` as is, ``"post-hoc"`` with ``post_hoc=True``."""
    recipe, beta = viking_knob(knob)
    return fit_viking(task, seed, beta, budget, post_hoc=recipe == "post-hoc")


def bnn_sampler(task: Task, bnn: BayesianNetwork, guide, num_samples: int,
                predictive: str = "sampled"):
    """S samples of the class probabilities ``(S, N, C)`` or regression means ``(S, N)``
    (``predictive="linearised"``: of the network linearised at the guide's mean)."""
    if predictive not in ("sampled", "linearised"):
        raise ValueError(f"predictive must be 'sampled' or 'linearised', got {predictive!r}")
    model = bnn.linearised(guide) if predictive == "linearised" else bnn
    outputs = pyro_sampler(task, model, guide, num_samples, site=bnn.output_site)
    return (lambda x: outputs(x).softmax(-1)) if task.classification else outputs


def _fitted(task: Task, bnn: BayesianNetwork, guide: AutoViking, budget: Budget, secs: float,
            predictive: str = "sampled", **info) -> Fitted:
    """The fitted guide's sampler (projected on the fit split before predicting) and its
    scales, for the harness."""
    info.update(sigma_im=float(guide.image_scale.detach()), sigma_ker=float(guide.kernel_scale),
                loc_norm=float(guide.loc.detach().norm()), bnn=bnn, guide=guide)
    inner = bnn_sampler(task, bnn, guide, budget.num_samples, predictive)

    def sample(x):
        guide.project_training_data(task.x_fit, task.y_fit, num_samples=budget.num_samples)
        return inner(x)

    noise = (float(pyro.param(bnn.noise_scale_name).detach())
             if bnn.noise_scale_name else None)
    return Fitted(sample, secs / budget.epochs, noise=noise, info=info)
