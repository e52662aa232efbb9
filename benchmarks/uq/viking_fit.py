"""The VIKING fit used by the benchmark, behind one function (:func:`fit_viking`).

Until ``pyro_viking.recipe`` lands this copies the recipe of ``tutorials/flagship_digits.py``
(itself the paper's three phases, scaled to the epoch budget):

1. MAP warm-up (``AutoDelta``, prior scale frozen at its initial e⁻²) for ``warmup`` of the
   epochs;
2. ``AutoViking`` at the MAP (``init_to_value``), only the scales train (σ_im and the learned
   prior scale s = σ_ker) for ``scales_only`` of the epochs;
3. the full ELBO, ``TraceViking_ELBO(beta)``, for the rest of the budget.

Prediction: ``guide.project_training_data`` projects S fresh samples on the kernel of the whole
fit split's Jacobian (counted in the prediction seconds), then ``Predictive``.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import pyro
from methods import Budget, Fitted, _new_net, _noise, _seed, pyro_sampler, run_svi
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from pyro_models import INIT_PRIOR_SCALE, PyroBNN, init_values
from tasks import Task

from pyro_viking import AutoViking, TraceViking_ELBO

INIT_IMAGE_SCALE = math.exp(-2)  # the paper's init log σ_im = −2
DEFAULT_OPTIONS = dict(init_image_scale=INIT_IMAGE_SCALE, kernel_scale="prior", gamma=0.5,
                       jacobian="loss", grad_through_projection=False)


def _freeze(lr: float, *names):
    """Adam arguments giving learning rate 0 to the named parameters (suffix match)."""
    return lambda name: {"lr": 0.0 if name.endswith(names) else lr}


def phase_epochs(epochs: int, warmup: Optional[int] = None):
    """(warm-up, scales-only, full ELBO) epochs: 1/12, 1/12 and the rest (the paper's 5+5+50),
    at least one each."""
    w = max(1, round(epochs / 12)) if warmup is None else warmup
    s = max(1, round(epochs / 12))
    return w, s, max(1, epochs - w - s)


#: "tutorial": the flagship tutorial's recipe below; "library": ``pyro_viking.recipe.fit_viking``
#: (MAP warm-up → curvature start of the scales → full ELBO), when the package has it.
RECIPE = "library"


def fit_viking(task: Task, seed: int, beta: float, budget: Budget, *,
               warmup: Optional[int] = None, particles: Optional[int] = None,
               batch_size: Optional[int] = None, **viking_options) -> Fitted:
    """Fit VIKING on the task's fit split (β is the one knob chosen on validation).

    ``viking_options`` override :data:`DEFAULT_OPTIONS` (AutoViking arguments); ``particles``
    and ``batch_size`` override the budget's (the data budget stays ``epochs × N``)."""
    if particles is not None or batch_size is not None:
        from dataclasses import replace

        budget = replace(budget, particles=particles or budget.particles,
                         batch_size=batch_size or budget.batch_size)
    if RECIPE == "library":
        return _fit_library(task, seed, beta, budget, warmup, viking_options)
    _seed(seed)
    model = PyroBNN(_new_net(task, seed), task.kind, prior_scale=None)
    w, s, full = phase_epochs(budget.epochs, warmup)
    start = time.perf_counter()
    map_values = init_values(model)
    if w > 0:  # warm-up = 0 (an ablation): AutoViking starts at the random initialisation
        map_guide = AutoDelta(model, init_loc_fn=init_to_value(values=map_values))
        run_svi(model, map_guide, Trace_ELBO(), task, w, budget,
                optim=pyro.optim.Adam(_freeze(budget.lr, "prior_scale")))
        map_values = {k: v.detach().clone()
                      for k, v in map_guide.median(task.x_fit, task.y_fit).items()}
    options = {**DEFAULT_OPTIONS, **viking_options}
    guide = AutoViking(model, init_loc_fn=init_to_value(values=map_values), **options)
    loss = TraceViking_ELBO(beta=beta, num_particles=budget.particles)
    run_svi(model, guide, loss, task, s, budget, optim=pyro.optim.Adam(_freeze(budget.lr, "loc")),
            particles=budget.particles)
    losses = run_svi(model, guide, loss, task, full, budget, particles=budget.particles)
    secs = time.perf_counter() - start
    store = pyro.get_param_store()
    prior = (float(store["prior_scale"].detach()) if "prior_scale" in store
             else INIT_PRIOR_SCALE)
    return _fitted(task, model, guide, budget, secs, prior_scale=prior,
                   final_loss=losses[-1], beta=beta)


def _fitted(task: Task, model, guide, budget: Budget, secs: float, **info) -> Fitted:
    """The fitted guide's sampler (projected on the fit split before predicting) and its
    scales, for the harness."""
    info.update(sigma_im=float(guide.image_scale.detach()), sigma_ker=float(guide.kernel_scale),
                loc_norm=float(guide.loc.detach().norm()))
    inner = pyro_sampler(task, model, guide, budget.num_samples)

    def sample(x):
        guide.project_training_data(task.x_fit, task.y_fit, budget.batch_size,
                                    num_samples=budget.num_samples)
        return inner(x)

    return Fitted(sample, secs / budget.epochs, noise=_noise(), info=info)


def _fit_library(task: Task, seed: int, beta: float, budget: Budget, warmup: Optional[int],
                 viking_options: dict) -> Fitted:
    """The same budget through ``pyro_viking.recipe.fit_viking``: warm-up 1/12 of the epochs,
    no scales-only phase (the recipe starts the scales from curvature), full ELBO for the
    rest; the same optimiser, particles and AutoViking options as the tutorial recipe."""
    from pyro_viking.recipe import fit_viking as recipe_fit_viking

    _seed(seed)
    model = PyroBNN(_new_net(task, seed), task.kind, prior_scale=None)
    w, _, _ = phase_epochs(budget.epochs, warmup)
    per_epoch = math.ceil(len(task.x_fit) / budget.batch_size)
    options = {k: v for k, v in {**DEFAULT_OPTIONS, **viking_options}.items()
               if k not in ("init_image_scale", "kernel_scale", "gamma")}
    start = time.perf_counter()
    fit = recipe_fit_viking(
        model, task.x_fit, task.y_fit, budget.batch_size,
        num_steps=max(1, (budget.epochs - w) * per_epoch // budget.particles),
        warmup_steps=w * per_epoch, beta=beta, optim=pyro.optim.Adam({"lr": budget.lr}),
        prior_scale_param="prior_scale", num_particles=budget.particles,
        gamma=viking_options.get("gamma", DEFAULT_OPTIONS["gamma"]), guide_options=options,
        progress=False)
    secs = time.perf_counter() - start
    return _fitted(task, model, fit.guide, budget, secs,
                   prior_scale=float(pyro.param("prior_scale").detach()), beta=beta,
                   init_sigma_im=float(fit.init["image_scale"]))
