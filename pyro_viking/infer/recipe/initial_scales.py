"""The curvature start of the VIKING recipe: :func:`initial_scales` reads the prior scale (fixed
or learned) and sets σ_im (and a learned prior scale) where the linearised β-tempered ELBO at the
MAP is smallest (:mod:`pyro_viking.infer.recipe.scale_init`), and warns when a fixed prior that
σ_ker is tied to is far wider than the kernel scale the ELBO prefers."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import pyro.poutine as poutine
import torch

from pyro_viking.infer.recipe.params import prior_scale_name
from pyro_viking.infer.recipe.scale_init import (
    CurvatureStatistics,
    curvature_statistics,
    optimal_scales,
)
from pyro_viking.infer.recipe.svi_loop import first_call
from pyro_viking.model_trace.priors import isotropic_prior_scale
from pyro_viking.user_warnings import warn

__all__ = ["WIDE_PRIOR_FACTOR", "initial_scales"]

#: :func:`initial_scales` warns when σ_ker, tied to a fixed prior scale ``s``, exceeds this
#: multiple of the kernel scale the linearised ELBO prefers at the MAP. It separates the cases of
#: ``test_a_fixed_prior_far_wider_than_the_kernel_scale_warns`` (``tests/infer/recipe/
#: test_fit.py``): a prior far wider than that scale, whose posterior samples predict far worse
#: than the MAP network, and narrower ones, whose samples predict as well as it.
WIDE_PRIOR_FACTOR = 5.0


def _fixed_prior_scale(model, args, kwargs, map_values) -> Optional[float]:
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=map_values)).get_trace(*args, **kwargs)
    for name in map_values:  # conditioning marks them observed; they are the latents
        trace.nodes[name]["is_observed"] = False
    scale = isotropic_prior_scale(trace, list(map_values))
    return None if scale is None else float(scale)


def initial_scales(model: Callable, map_values: Dict[str, torch.Tensor], *args,
                   beta: float, batches: Optional[Iterable] = None,
                   prior_scale_param: Optional[str] = None, kernel: str = "prior",
                   statistics: Optional[CurvatureStatistics] = None,
                   num_batches: int = 8, num_label_samples: int = 4,
                   **kwargs) -> Tuple[Dict[str, float], CurvatureStatistics]:
    """Scales minimising the linearised β-tempered ELBO at ``θ̂`` (see
    :mod:`pyro_viking.infer.recipe.scale_init`); returns ``(scales, statistics)``.

    With a learned prior scale (``prior_scale_param``, or a model's ``prior_scale_name``) the
    prior precision is optimised as well; otherwise the model's fixed isotropic prior scale is
    read from its trace. ``statistics`` reuses an earlier estimate (e.g. across β).
    """
    name = prior_scale_name(model, prior_scale_param)
    if statistics is None:
        statistics = curvature_statistics(model, map_values, *args, batches=batches,
                                          num_batches=num_batches,
                                          num_label_samples=num_label_samples, **kwargs)
    fixed = None
    if name is None:
        first_args, first_kwargs = first_call(args, kwargs, batches)
        fixed = _fixed_prior_scale(model, first_args, first_kwargs, map_values)
        if fixed is None:
            raise ValueError("the curvature start needs an isotropic Normal prior (one scale for "
                             "every latent); pass init_scales=False and set the scales yourself")
    scales = optimal_scales(statistics, beta, prior_scale=fixed, kernel=kernel)
    if fixed is not None and kernel == "prior":
        _warn_if_prior_too_wide(statistics, beta, fixed)
    return scales, statistics


def _warn_if_prior_too_wide(stats: CurvatureStatistics, beta: float, prior_scale: float) -> None:
    """Warn when ``σ_ker = s`` (a fixed prior scale) is far wider than the kernel scale the
    ELBO would choose at this prior: kernel noise of the prior's size leaves the network's
    linear regime around θ̂, and the posterior samples stop fitting the data."""
    best = optimal_scales(stats, beta, prior_scale=prior_scale, kernel="learned")["kernel_scale"]
    if not prior_scale > WIDE_PRIOR_FACTOR * best:
        return
    cost, cost_best = stats.kernel_cost(prior_scale ** 2), stats.kernel_cost(best ** 2)
    warn(
        f"σ_ker is tied to the model's fixed prior scale s = {prior_scale:.3g}, but at the MAP "
        f"the ELBO prefers a kernel scale of {best:.3g} ({prior_scale / best:.0f}× smaller): "
        f"kernel noise of the prior's size is predicted to cost {cost:.4g} nats of expected "
        f"log-likelihood ({cost_best:.3g} at {best:.3g}), "
        "so posterior samples will fit the data far worse than the MAP. Learn the prior scale "
        "(BayesianNetwork(prior_scale='learned'): the recipe sets it from curvature), use a "
        "smaller prior scale, or untie σ_ker (fit_viking(kernel_scale='learned')).")
