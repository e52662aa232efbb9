r"""The VIKING recipe as one call: MAP warm-up → scales from curvature → full ELBO.

    fit = fit_viking(model, x, y, num_steps=2000, optim=pyro.optim.Adam({"lr": 3e-3}))
    guide = fit.guide                                  # a fitted AutoViking
    guide.project_training_data(x, y)                  # before Predictive
    samples = Predictive(model, guide=guide, num_samples=100)(x_test)

Phases (each a loop of training steps with the optimiser you pass: the ELBO as a PyTorch module
stepped by ``torch.optim`` optimisers built from it, or :class:`~pyro.infer.SVI`, which takes the
same steps; ``engine=``, :mod:`~pyro_viking.infer.recipe.engine`):

1. **MAP warm-up** (``warmup_steps``; :mod:`~pyro_viking.infer.recipe.warmup`):
   :class:`~pyro.infer.autoguide.AutoDelta` with :class:`~pyro.infer.Trace_ELBO`; a learned
   prior scale (``prior_scale_param``) is held at its current value (hidden from the
   optimiser), so this is MAP with weight decay ``1/s²``.
2. **Scales from curvature** (no steps; :mod:`~pyro_viking.infer.recipe.initial_scales`): at
   the MAP ``θ̂``, the linearised β-tempered ELBO is minimised in ``σ_im`` and the prior
   precision ``α = 1/s²`` (``σ_ker² = 1/α`` when tied) in closed form from ``tr(H(I − P))``,
   ``tr(HP)``, ``rank J`` and ``‖θ̂‖²`` (:mod:`pyro_viking.infer.recipe.scale_init`, where the
   derivation is). The learned prior scale is set in Pyro's param store; the guide starts at
   ``θ̂`` with that ``σ_im``. Before, a :class:`~pyro_viking.BayesianNetwork`'s learned
   regression noise scale is set to its maximum-likelihood value at ``θ̂``, the root mean
   squared residual on the training data (Adam moves a log-scale by about the learning rate per
   step, so the warm-up leaves it far from its optimum, and the curvature scales with ``1/σ²``).
3. optional **scales only** (``scales_steps``): the full ELBO with ``θ̂`` hidden from the
   optimiser (the paper's phase; with the curvature start it is rarely needed).
4. **full ELBO** (``num_steps``): :class:`~pyro_viking.TraceViking_ELBO` (``beta``).

Data: either the model's own arguments, passed at every step (a model that subsamples its data
plate, ``pyro.plate("data", N, subsample_size=B)``, draws a fresh minibatch per call), or
``batches=``, an iterable of batches (argument tuples, kwargs dicts, or ``(args, kwargs)``
pairs; e.g. a ``DataLoader``), cycled as often as needed. With ``batches``, the model must scale
its likelihood to the full data set itself (``pyro.plate("data", N, subsample=idx)`` or
``poutine.scale``), as any minibatch SVI in Pyro requires.

No state is kept outside the returned :class:`VikingFit` and Pyro's param store, and none is
read from earlier fits: a fit first deletes the param-store entries it owns (its guides' and a
:class:`~pyro_viking.BayesianNetwork`'s own, :mod:`~pyro_viking.infer.recipe.arguments`), and a
``BayesianNetwork``'s weights are copied, never trained in place, so two fits in one process
give what each gives in a fresh one (same seed). Step counts, batches and ``num_data`` are
checked before the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import init_to_value
from pyro.optim import PyroOptim

from pyro_viking.infer.autoguide.guide import AutoViking
from pyro_viking.infer.elbo import TraceViking_ELBO
from pyro_viking.infer.recipe.arguments import (
    check_steps,
    check_training_data,
    reset_owned_params,
)
from pyro_viking.infer.recipe.engine import DEFAULT_ENGINE, make_stepper, resolve_engine
from pyro_viking.infer.recipe.initial_scales import initial_scales
from pyro_viking.infer.recipe.params import prior_scale_name, set_positive_param, with_scale_lr
from pyro_viking.infer.recipe.scale_init import CurvatureStatistics
from pyro_viking.infer.recipe.svi_loop import new_history, run_phase, training_calls
from pyro_viking.infer.recipe.warmup import fit_map, set_noise_scale_at_map

__all__ = ["DEFAULT_BETA", "POST_HOC_WARMUP_STEPS", "VikingFit", "default_warmup_steps",
           "fit_viking"]

#: Default KL weight (Pyro's convention: the plate already scales the likelihood by N/B, so
#: β = 1 is the true ELBO), chosen on the validation splits of the uncertainty benchmark
#: (``benchmarks/uq``: the scores per β and task are in ``benchmarks/uq/README.md``).
#: :func:`~pyro_viking.select_beta` chooses β for a task on its own validation split.
DEFAULT_BETA = 0.001

#: MAP warm-up steps of ``fit_viking(..., num_steps=0)`` (the posterior at a MAP) when
#: ``warmup_steps`` is not given (otherwise the warm-up is a quarter of ``num_steps``)
POST_HOC_WARMUP_STEPS = 1000


def default_warmup_steps(num_steps: int, warmup_steps: Optional[int] = None) -> int:
    """The MAP warm-up steps of ``fit_viking(num_steps=..., warmup_steps=...)``: those given,
    else ``num_steps // 4``, else (no ELBO step) :data:`POST_HOC_WARMUP_STEPS`."""
    if warmup_steps is not None:
        return warmup_steps
    return num_steps // 4 if num_steps else POST_HOC_WARMUP_STEPS


@dataclass
class VikingFit:
    """The result of :func:`fit_viking`.

    :ivar guide: the fitted :class:`~pyro_viking.AutoViking`.
    :ivar history: per SVI step: ``"phase"`` (``"map"``, ``"scales"``, ``"elbo"``), ``"loss"``,
        ``"image_scale"`` (σ_im), ``"kernel_scale"`` (σ_ker), ``"prior_scale"`` (the learned
        prior scale, or ``nan``); scales are ``nan`` during the MAP phase.
    :ivar statistics: the curvature statistics at the MAP (``None`` without curvature start).
    :ivar init: the scales the guide started from (``image_scale``, ``kernel_scale``,
        ``prior_scale``).
    :ivar map_values: the MAP estimate ``θ̂`` (``{site: value}``).
    :ivar beta: the KL weight of the fit.
    """

    guide: AutoViking
    history: Dict[str, list]
    statistics: Optional[CurvatureStatistics]
    init: Dict[str, float]
    map_values: Dict[str, torch.Tensor]
    beta: float = DEFAULT_BETA


def fit_viking(
    model: Callable,
    *args,
    batches: Optional[Iterable] = None,
    num_steps: int = 1000,
    warmup_steps: Optional[int] = None,
    scales_steps: int = 0,
    beta: float = DEFAULT_BETA,
    optim: Optional[PyroOptim] = None,
    scales_lr_factor: Optional[float] = None,
    prior_scale_param: Optional[str] = None,
    kernel_scale: str = "prior",
    init_scales: bool = True,
    init_image_scale: float = math.exp(-2),
    num_particles: int = 1,
    gamma: float = 0.5,
    guide_options: Optional[dict] = None,
    map_values: Optional[Dict[str, torch.Tensor]] = None,
    init_loc_fn: Optional[Callable] = None,
    temper_warmup: bool = True,
    statistics: Optional[CurvatureStatistics] = None,
    curvature_batches: int = 8,
    num_label_samples: int = 4,
    progress: bool = True,
    engine: str = DEFAULT_ENGINE,
    **kwargs,
) -> VikingFit:
    """Fit an :class:`~pyro_viking.AutoViking` guide to ``model`` with the VIKING recipe.

    :param model: a Pyro model; ``model(*args, **kwargs)`` (or each of ``batches``) is one step.
    :param batches: an iterable of batches instead of ``args``/``kwargs`` (module docstring).
    :param num_steps: SVI steps of the full ELBO phase. ``0`` gives the posterior at the
        (tempered) MAP with the curvature scales of phase 2, set up and ready for
        ``Predictive``: no training under sampled weights (a post-hoc VIKING, as a Laplace
        approximation is post-hoc).
    :param warmup_steps: MAP steps (default ``num_steps // 4``, or
        :data:`POST_HOC_WARMUP_STEPS` when ``num_steps`` is 0; none with ``map_values``).
    :param scales_steps: steps of the optional scales-only phase (``θ̂`` frozen).
    :param beta: KL weight of :class:`~pyro_viking.TraceViking_ELBO` (:data:`DEFAULT_BETA`).
    :param optim: any Pyro optimiser (default ``Adam(lr=1e-3)``), used in every phase.
    :param scales_lr_factor: multiply the learning rate of σ_im, σ_ker and the learned prior
        scale by this factor (needs an optimiser built from a dict or callable with ``lr``).
    :param prior_scale_param: name of a ``pyro.param`` holding the prior's standard deviation
        (a learned prior scale read by the model's priors); found on a
        :class:`~pyro_viking.BayesianNetwork` automatically. ``None`` and no such attribute:
        the prior scale is fixed.
    :param kernel_scale: ``"prior"`` (σ_ker tied to the prior scale) or ``"learned"``.
    :param init_scales: start σ_im (and the learned prior scale) at the curvature optimum;
        ``False`` starts σ_im at ``init_image_scale`` and leaves the prior scale alone.
    :param num_particles: Monte Carlo samples per ELBO step (each draws its own minibatch of a
        subsampled plate: Pyro re-runs the model per particle).
    :param gamma: memory of the stochastic alternating projections (``AutoViking(gamma=)``).
    :param guide_options: further ``AutoViking`` arguments (``backend``, ``jacobian``, ...).
    :param map_values: a MAP estimate to start from (skips the warm-up).
    :param init_loc_fn: where the warm-up starts (default: the model's ``init_loc_fn`` if it
        has one, as :class:`~pyro_viking.BayesianNetwork` does, else ``init_to_median``).
    :param temper_warmup: weight the prior by ``beta`` in the warm-up (weight decay ``β α``),
        so the warm-up ends near the mean the tempered ELBO prefers; ``False``: plain MAP.
    :param statistics: curvature statistics at ``map_values`` to reuse (skips their estimate).
    :param curvature_batches, num_label_samples: batches and Monte Carlo labels per batch of
        the curvature estimate (:func:`~pyro_viking.infer.recipe.scale_init.curvature_statistics`).
    :param progress: tqdm progress bars.
    :param engine: what takes the steps of every phase: ``"svi"`` (Pyro's ``SVI``),
        ``"module"`` (the ELBO module and ``torch.optim`` optimisers built from ``optim``; a
        ``ValueError`` names an optimiser it cannot take) or ``"auto"`` (the default:
        ``"module"`` where ``optim`` allows it, else ``"svi"``); the same steps and results
        (:mod:`~pyro_viking.infer.recipe.engine`).
    """
    check_steps(num_steps=num_steps, warmup_steps=warmup_steps, scales_steps=scales_steps)
    check_training_data(model, args, batches)
    reset_owned_params(model)
    optim = optim or pyro.optim.Adam({"lr": 1e-3})
    engine = resolve_engine(engine, optim)
    name = prior_scale_name(model, prior_scale_param)
    history = new_history()
    if map_values is None:
        warmup = default_warmup_steps(num_steps, warmup_steps)
        map_values = fit_map(model, *args, batches=batches, num_steps=warmup, optim=optim,
                             prior_scale_param=name, init_loc_fn=init_loc_fn,
                             progress=progress, history=history,
                             prior_weight=beta if temper_warmup else 1.0, engine=engine,
                             **kwargs)
    if init_scales:
        set_noise_scale_at_map(model, map_values, *args, batches=batches,
                               num_batches=curvature_batches, **kwargs)
        init, statistics = initial_scales(
            model, map_values, *args, beta=beta, batches=batches, prior_scale_param=name,
            kernel=kernel_scale, statistics=statistics, num_batches=curvature_batches,
            num_label_samples=num_label_samples, **kwargs)
        if name is not None:
            set_positive_param(name, init["prior_scale"], like=next(iter(map_values.values())))
    else:
        store = pyro.get_param_store()
        init = {"image_scale": init_image_scale, "kernel_scale": math.nan,
                "prior_scale": float(store[name].detach()) if name in store else math.nan}
    options = dict(init_image_scale=init["image_scale"], kernel_scale=kernel_scale, gamma=gamma,
                   grad_through_projection=False)
    if kernel_scale == "learned" and init_scales:
        options["init_kernel_scale"] = init["kernel_scale"]
    options.update(guide_options or {})
    guide = AutoViking(model, init_loc_fn=init_to_value(values=map_values), **options)
    elbo = TraceViking_ELBO(beta=beta, num_particles=num_particles)
    record, calls = _recorder(guide, name), training_calls(args, kwargs, batches)
    optim = optim if scales_lr_factor is None else _with_scales_lr(optim, scales_lr_factor, name)
    if scales_steps:
        frozen = poutine.block(guide, hide_fn=lambda msg: msg["type"] == "param"
                               and msg["name"].endswith(".loc"))
        run_phase(make_stepper(engine, model, frozen, optim, elbo), calls, scales_steps,
                  "scales", history, record, progress, image_scale=options["init_image_scale"])
    start = history["image_scale"][-1] if scales_steps else options["init_image_scale"]
    run_phase(make_stepper(engine, model, guide, optim, elbo), calls, num_steps, "elbo",
              history, record, progress, image_scale=start)
    if guide.prototype_trace is None:  # no ELBO step: set the guide up on one training call
        a, kw = next(calls)
        with poutine.block():
            guide(*a, **kw)
    return VikingFit(guide=guide, history=history, statistics=statistics, init=init,
                     map_values=map_values, beta=beta)


def _recorder(guide: AutoViking, name: Optional[str]) -> Callable[[], Tuple[float, float, float]]:
    """``() -> (σ_im, σ_ker, learned prior scale or nan)`` now: one step's history row."""

    def record() -> Tuple[float, float, float]:
        prior = float(pyro.param(name).detach()) if name else math.nan
        return float(guide.image_scale.detach()), float(guide.kernel_scale), prior

    return record


def _with_scales_lr(optim: PyroOptim, factor: float, name: Optional[str]) -> PyroOptim:
    """``optim`` with the learning rate of σ_im, σ_ker and the learned prior scale ``name``
    multiplied by ``factor``."""
    scale_names = {name} if name else set()
    return with_scale_lr(optim, factor, lambda n: n in scale_names or n.endswith(
        ("image_scale", "kernel_scale", "kernel_scale_unconstrained")))
