"""Choose VIKING's KL weight β, and whether to train under the noise at all, on a validation
split: one :func:`~pyro_viking.fit_viking` per candidate (β, recipe) (its tempered warm-up depends
on β, so nothing is shared), scored by the validation NLL of the Bayesian model average

    NLL = −(1/N_val) Σ_i log( (1/S) Σ_s p(y_i | x_i, θ_s) ),   θ_s ~ q (projected on the
    training data, as for prediction).

Recipes (the same number of training steps, so the same examples seen):

* ``"elbo"``: the MAP warm-up, the curvature scales, then ``num_steps`` of the full ELBO;
* ``"post-hoc"``: a MAP for all of those steps, then the curvature scales at it and no ELBO step
  (``fit_viking(num_steps=0)``), the posterior at a converged MAP, as a post-hoc Laplace is.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import pyro
import torch
from pyro.infer import Predictive
from pyro.util import get_rng_state, set_rng_state

from pyro_viking.infer.recipe.engine import DEFAULT_ENGINE
from pyro_viking.infer.recipe.fit import VikingFit, default_warmup_steps, fit_viking
from pyro_viking.infer.recipe.params import prior_scale_name
from pyro_viking.model_trace.inspection import batch_call
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn, observed_data_frames

__all__ = ["BetaSelection", "DEFAULT_BETA_GRID", "DEFAULT_RECIPES", "RECIPES", "select_beta",
           "validation_nll"]

#: Candidates of :func:`select_beta` (Pyro's convention: β = 1 is the true ELBO); the β chosen
#: on the uncertainty benchmark's tasks are in ``benchmarks/uq/README.md``.
DEFAULT_BETA_GRID = (1.0, 0.1, 0.01, 0.001)
#: The recipes :func:`select_beta` can compare (module docstring)
RECIPES = ("elbo", "post-hoc")
#: What :func:`select_beta` compares by default: both (``benchmarks/uq/mechanism.md``)
DEFAULT_RECIPES = RECIPES


class BetaSelection(NamedTuple):
    """``beta``, ``recipe``: the choice; ``table``: one dict per candidate (``beta``,
    ``recipe``, ``val_nll``, ``val_nll_se``, ``image_scale``, ``kernel_scale``,
    ``prior_scale`` at the end of training); ``fit``: the :class:`~pyro_viking.VikingFit` of
    the choice (Pyro's param store holds its parameters on return)."""

    beta: float
    table: List[Dict[str, float]]
    fit: VikingFit
    recipe: str = "elbo"


def validation_nll(model: Callable, guide, *args, num_samples: int = 32,
                   **kwargs) -> torch.Tensor:
    """Per-datum ``−log (1/S) Σ_s p(y_i | θ_s)`` of ``model(*args, **kwargs)`` (the validation
    data with their labels) under ``S`` posterior samples of ``guide``. Every datum counts: a
    plate that subsamples its data at random (e.g. a :class:`~pyro_viking.BayesianNetwork`
    whose ``batch_size`` is below the validation size) is walked in consecutive minibatches of
    its subsample size (Pyro fixes that size), the last one wrapped around and trimmed.

    Returns a tensor ``(N_val,)`` (float64). Project the guide on the training data first
    (``guide.project_training_data``), as for any prediction.
    """
    with torch.no_grad():
        with pyro.poutine.block():
            trace = pyro.poutine.trace(model).get_trace(*args, **kwargs)
        frames = observed_data_frames(trace)  # plates of observed data drawing random indices
        if len(frames) > 1:
            raise ValueError(f"validation_nll walks one subsampled plate, the model has "
                             f"{sorted(frames)}: call it on data that fit in one batch")
        chunks = [({}, None)]  # (subsample indices, how many of its rows are new data)
        for name, frame in frames.items():
            order = torch.arange(frame.full_size, device=trace.nodes[name]["value"].device)
            chunks = [({name: order.roll(-start)[:frame.size]}, frame.full_size - start)
                      for start in range(0, frame.full_size, frame.size)]
        layout = LatentLayout.from_trace(trace)
        samples = Predictive(pyro.poutine.condition(model, data=chunks[0][0]), guide=guide,
                             num_samples=num_samples,
                             return_sites=list(layout.names))(*args, **kwargs)
        z = layout.pack({n: samples[n].reshape((num_samples,) + trace.nodes[n]["value"].shape)
                         for n in layout.names})
        parts = []
        for chunk, keep in chunks:
            rows = make_rows_fn(model, layout, args, kwargs, subsample=chunk)
            parts.append(torch.stack([rows(z[s]).double() for s in range(num_samples)])[:, :keep])
        loglik = torch.cat(parts, dim=1)
    return -(torch.logsumexp(loglik, 0) - math.log(num_samples))


def select_beta(
    model: Callable,
    *args,
    validation: Sequence,
    betas: Iterable[float] = DEFAULT_BETA_GRID,
    batches: Optional[Iterable] = None,
    num_steps: int = 1000,
    warmup_steps: Optional[int] = None,
    optim_factory: Optional[Callable[[], object]] = None,
    num_samples: int = 32,
    prior_scale_param: Optional[str] = None,
    progress: bool = True,
    fit_options: Optional[dict] = None,
    recipes: Iterable[str] = DEFAULT_RECIPES,
    engine: str = DEFAULT_ENGINE,
    **kwargs,
) -> BetaSelection:
    """Fit VIKING for each β and recipe on the training data and keep the best validation
    NLL.

    :param model, args, kwargs, batches: the training call(s), as for
        :func:`~pyro_viking.fit_viking`.
    :param validation: the validation call: an argument tuple with the labels (e.g.
        ``(x_val, y_val)``), a kwargs dict, or an ``(args, kwargs)`` pair; not subsampled.
    :param betas: the candidate KL weights.
    :param recipes: ``"elbo"`` and/or ``"post-hoc"`` (module docstring), each at every β.
    :param num_steps, warmup_steps: as in :func:`~pyro_viking.fit_viking` (``"post-hoc"``:
        a MAP of the ``"elbo"`` candidate's warm-up plus ``num_steps`` steps, the warm-up's
        default as there, :func:`~pyro_viking.infer.recipe.fit.default_warmup_steps`).
    :param optim_factory: a fresh Pyro optimiser per phase (default ``Adam(lr=1e-3)``).
    :param num_samples: posterior samples for the validation NLL.
    :param fit_options: further :func:`~pyro_viking.fit_viking` arguments.
    :param engine: what trains each fit (``fit_viking``'s ``engine``: ``"svi"``, ``"module"``
        or ``"auto"``).
    """
    betas = [float(b) for b in betas]
    if not betas or any(not b >= 0 for b in betas):
        raise ValueError(f"betas must be one or more non-negative KL weights, got {betas}")
    recipes = list(recipes)
    if not recipes or any(r not in RECIPES for r in recipes):
        raise ValueError(f"recipes must be one or more of {RECIPES}, got {recipes}")
    total = default_warmup_steps(num_steps, warmup_steps) + num_steps
    make_optim = optim_factory or (lambda: pyro.optim.Adam({"lr": 1e-3}))
    store = pyro.get_param_store()
    start, rng = _snapshot(store), get_rng_state()
    name = prior_scale_name(model, prior_scale_param)
    val_args, val_kwargs = batch_call(tuple(validation) if isinstance(validation, list)
                                    else validation)
    table, fits, states = [], [], []
    for recipe, beta in [(r, b) for r in recipes for b in betas]:
        # every candidate starts from the same store and random numbers: its fit is the one
        # it would get alone, whatever the order of the candidates
        store.set_state(copy.deepcopy(start))
        set_rng_state(rng)
        steps = dict(num_steps=num_steps, warmup_steps=warmup_steps) if recipe == "elbo" \
            else dict(num_steps=0, warmup_steps=total)
        fit = fit_viking(model, *args, batches=batches, **steps, beta=beta, optim=make_optim(),
                         prior_scale_param=prior_scale_param, progress=progress,
                         **{"engine": engine, **(fit_options or {})}, **kwargs)
        fit.guide.project_training_data(*args, batches=batches, num_samples=num_samples, **kwargs)
        nll = validation_nll(model, fit.guide, *val_args, num_samples=num_samples, **val_kwargs)
        table.append(dict(beta=beta, recipe=recipe, val_nll=float(nll.mean()),
                          val_nll_se=float(nll.std() / math.sqrt(len(nll))),
                          image_scale=float(fit.guide.image_scale.detach()),
                          kernel_scale=float(fit.guide.kernel_scale),
                          prior_scale=float(store[name].detach()) if name in store else math.nan))
        fits.append(fit)
        states.append(_snapshot(store))
    best = min(range(len(table)), key=lambda i: table[i]["val_nll"])
    store.set_state(states[best])
    return BetaSelection(table[best]["beta"], table, fits[best], table[best]["recipe"])


def _snapshot(store) -> dict:
    """A copy of the param store's state that later training (in place) does not change."""
    return copy.deepcopy(store.get_state())
