"""The MAP warm-up of the VIKING recipe: :func:`fit_map` (SVI, or the ELBO module, with
:class:`~pyro.infer.autoguide.AutoDelta`, the prior optionally β-tempered) and
:func:`set_noise_scale_at_map` (a :class:`~pyro_viking.BayesianNetwork`'s learned regression
noise scale set to its maximum-likelihood value at the MAP)."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Iterable, Optional

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_median
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger

from pyro_viking.infer.recipe.engine import DEFAULT_ENGINE, make_stepper
from pyro_viking.infer.recipe.params import hide_param, prior_scale_name, set_positive_param
from pyro_viking.infer.recipe.svi_loop import first_call, new_history, run_phase, training_calls
from pyro_viking.model_trace.inspection import batch_call
from pyro_viking.nn.bayesian_network import BayesianNetwork
from pyro_viking.user_warnings import warn

__all__ = ["INTERPOLATION_FRACTION", "NOISE_CHUNK_ROWS", "fit_map", "set_noise_scale_at_map"]

#: rows per network call of :func:`set_noise_scale_at_map`
NOISE_CHUNK_ROWS = 4096


class _WeightPrior(Messenger):
    """Multiply the log density of every latent (non-observed) sample site by ``weight``:
    under ``AutoDelta`` the MAP loss becomes ``−log p(y | θ) − weight · log p(θ)``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.weight


def _init_loc_fn(model: Callable, init_loc_fn: Optional[Callable]) -> Callable:
    if init_loc_fn is not None:
        return init_loc_fn
    return getattr(model, "init_loc_fn", None) or init_to_median  # BayesianNetwork: its weights


def fit_map(model: Callable, *args, batches: Optional[Iterable] = None, num_steps: int = 1000,
            optim: Optional[PyroOptim] = None, prior_scale_param: Optional[str] = None,
            prior_weight: float = 1.0, init_loc_fn: Optional[Callable] = None,
            progress: bool = True, history: Optional[Dict[str, list]] = None,
            engine: str = DEFAULT_ENGINE, **kwargs) -> Dict[str, torch.Tensor]:
    """MAP by SVI with :class:`~pyro.infer.autoguide.AutoDelta`; returns ``{site: θ̂}``.
    ``engine``: what takes the steps (:mod:`~pyro_viking.infer.recipe.engine`).

    The loss is ``−log p(y | θ) − prior_weight · log p(θ)``. With ``prior_weight = β`` its
    minimiser is the mean the β-tempered ELBO prefers (the ELBO's ``β α ‖θ̂‖²/2``), up to
    the curvature term ``½ tr(HΣ)``. The ``pyro.param`` named ``prior_scale_param`` (a learned
    prior scale) is not optimised. ``init_loc_fn``: where the MAP starts (default: the model's
    own ``init_loc_fn``, e.g. a :class:`~pyro_viking.BayesianNetwork`'s initialised weights,
    else Pyro's ``init_to_median``; the prior median of zero-mean weights is a near-zero
    network, which trains much worse than PyTorch's initialisation).
    """
    name = prior_scale_name(model, prior_scale_param)
    target = hide_param(model, name)
    if prior_weight != 1.0:
        target = _WeightPrior(prior_weight)(target)
    guide = AutoDelta(hide_param(model, name), init_loc_fn=_init_loc_fn(model, init_loc_fn))
    svi = make_stepper(engine, target, guide, optim or pyro.optim.Adam({"lr": 1e-3}),
                       Trace_ELBO())
    history = history if history is not None else new_history()
    nan = float("nan")
    prior = (lambda: float(pyro.param(name).detach())) if name else (lambda: nan)
    run_phase(svi, training_calls(args, kwargs, batches), num_steps, "map", history,
              lambda: (nan, nan, prior()), progress)
    first_args, first_kwargs = first_call(args, kwargs, batches)
    with torch.no_grad():
        return {k: v.detach().clone()
                for k, v in guide.median(*first_args, **first_kwargs).items()}


def set_noise_scale_at_map(model: Callable, map_values: Dict[str, torch.Tensor], *args,
                           batches: Optional[Iterable] = None, num_batches: int = 8,
                           **kwargs) -> Optional[float]:
    """Set a :class:`~pyro_viking.BayesianNetwork`'s learned regression noise scale to its
    maximum-likelihood value at the MAP, ``σ² = mean_i ‖y_i − f(x_i; θ̂)‖² / O`` over the
    training data ``bnn(x, y)`` (all of ``x``, or the first ``num_batches`` of ``batches``);
    returns ``σ``, or ``None`` (and changes nothing) for any other model."""
    name = getattr(model, "noise_scale_name", None)
    if not isinstance(model, BayesianNetwork) or name is None:
        return None
    calls = [(args, kwargs)] if batches is None else \
        [batch_call(b) for b in itertools.islice(batches, num_batches)]
    latent = {n: map_values[model.site_name(n)] for n in model.latent_shapes}
    total = count = 0.0
    targets = []
    with torch.no_grad():
        for a, kw in calls:
            x, y = a[0], (a[1] if len(a) > 1 else kw.get("y"))
            for i in range(0, len(x), NOISE_CHUNK_ROWS):
                out = model.forward_network(latent, x[i:i + NOISE_CHUNK_ROWS])
                t = y[i:i + NOISE_CHUNK_ROWS].reshape(out.shape[0], -1).to(out.dtype)
                r = out.reshape(out.shape[0], -1) - t
                total += float(r.double().pow(2).sum())
                count += r.numel()
                targets.append(t.double())
    sigma = math.sqrt(total / count) if count else math.nan
    if not (math.isfinite(sigma) and sigma > 0):
        return None  # no data, an exact or a diverged fit: leave the learned value
    _warn_if_interpolating(sigma, torch.cat(targets),
                           sum(math.prod(s) for s in model.latent_shapes.values()))
    set_positive_param(name, sigma, like=next(iter(latent.values())))
    return sigma


#: a MAP residual below this fraction of the targets' spread, on no more targets than weights,
#: is taken for interpolation
INTERPOLATION_FRACTION = 0.05


def _warn_if_interpolating(sigma: float, targets: torch.Tensor, num_weights: int) -> None:
    """Warn when the MAP interpolates the training targets: with at most as many targets as
    weights and a residual far below their spread, the residual says nothing about the noise
    and the learned noise scale (and with it the predictive spread) collapses."""
    spread = float(targets.std()) if targets.numel() > 1 else math.nan
    if targets.numel() <= num_weights and sigma < INTERPOLATION_FRACTION * spread:
        warn(f"the MAP fits the {targets.numel()} training targets almost exactly (RMS residual "
             f"{sigma:.3g}, targets' std {spread:.3g}): the learned noise scale set from it is "
             "unreliable and predictive intervals will be far too narrow. Give a known "
             "noise_scale=<float> to BayesianNetwork, or train on more data.")
