r"""The VIKING recipe as one call: MAP warm-up → scales from curvature → full ELBO.

    fit = fit_viking(model, x, y, num_steps=2000, optim=pyro.optim.Adam({"lr": 3e-3}))
    guide = fit.guide                                  # a fitted AutoViking
    guide.project_training_data(x, y)                  # before Predictive
    samples = Predictive(model, guide=guide, num_samples=100)(x_test)

Phases (each a plain :class:`~pyro.infer.SVI` loop with the optimiser you pass):

1. **MAP warm-up** (``warmup_steps``): :class:`~pyro.infer.autoguide.AutoDelta` with
   :class:`~pyro.infer.Trace_ELBO`; a learned prior scale (``prior_scale_param``) is held at its
   current value (hidden from the optimiser), so this is MAP with weight decay ``1/s²``.
2. **Scales from curvature** (no steps): at the MAP ``θ̂``, the linearised β-tempered ELBO is
   minimised in ``σ_im`` and the prior precision ``α = 1/s²`` (``σ_ker² = 1/α`` when tied) in
   closed form from ``tr(H(I − P))``, ``tr(HP)``, ``rank J`` and ``‖θ̂‖²``
   (:mod:`pyro_viking.scale_init`, where the derivation is). The learned prior scale is set in
   Pyro's param store; the guide starts at ``θ̂`` with that ``σ_im``. Before, a
   :class:`~pyro_viking.BayesianNetwork`'s learned regression noise scale is set to its
   maximum-likelihood value at ``θ̂``, the root mean squared residual on the training data
   (Adam moves a log-scale by about the learning rate per step, so the warm-up leaves it far
   from its optimum, and the curvature scales with ``1/σ²``).
3. optional **scales only** (``scales_steps``): the full ELBO with ``θ̂`` hidden from the
   optimiser (the paper's phase; with the curvature start it is rarely needed).
4. **full ELBO** (``num_steps``): :class:`~pyro_viking.TraceViking_ELBO` (``beta``).

Data: either the model's own arguments, passed at every step (a model that subsamples its data
plate, ``pyro.plate("data", N, subsample_size=B)``, draws a fresh minibatch per call), or
``batches=``, an iterable of batches (argument tuples, kwargs dicts, or ``(args, kwargs)``
pairs; e.g. a ``DataLoader``), cycled as often as needed. With ``batches``, the model must scale
its likelihood to the full data set itself (``pyro.plate("data", N, subsample=idx)`` or
``poutine.scale``), as any minibatch SVI in Pyro requires.

No state is kept outside the returned :class:`VikingFit` and Pyro's param store.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_median, init_to_value
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

from pyro_viking.infer.autoguide.guide import AutoViking
from pyro_viking.infer.elbo import TraceViking_ELBO
from pyro_viking.infer.recipe.scale_init import (
    CurvatureStatistics,
    curvature_statistics,
    optimal_scales,
)
from pyro_viking.model_trace.inspection import batch_call
from pyro_viking.model_trace.priors import isotropic_prior_scale
from pyro_viking.nn.bayesian_network import BayesianNetwork
from pyro_viking.user_warnings import warn

__all__ = ["DEFAULT_BETA", "VikingFit", "fit_map", "fit_viking", "initial_scales",
           "set_noise_scale_at_map"]

#: Default KL weight for classification BNNs (Pyro's convention: the plate already scales the
#: likelihood by N/B, so β = 1 is the true ELBO). Chosen on the validation splits of the
#: uncertainty benchmark (``benchmarks/uq``: scikit-learn digits with an MLP, MNIST-1D with a
#: 1-D CNN; ``BayesianNetwork`` with a learned prior scale, this recipe, seeds 0–2): validation
#: NLL at β = 0.03 / 0.01 / 0.001 was 0.079 / 0.071 / 0.068 (± 0.006–0.010) on digits and
#: 1.070 / 0.985 / 0.926 (± 0.03–0.05) on MNIST-1D; β = 1 and 0.1 were far worse on
#: digits (0.90 and 0.107, seed 0). On the benchmark's regression (diabetes) 0.01 was best
#: (1.108 against 1.116 at 0.001). :func:`~pyro_viking.select_beta` re-chooses it.
DEFAULT_BETA = 0.001


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
    """

    guide: AutoViking
    history: Dict[str, list]
    statistics: Optional[CurvatureStatistics]
    init: Dict[str, float]
    map_values: Dict[str, torch.Tensor]
    beta: float = 1.0
    extra: Dict[str, object] = field(default_factory=dict)


# -- data --------------------------------------------------------------------------------------
def _calls(args: tuple, kwargs: dict, batches: Optional[Iterable]) -> Iterator[Tuple[tuple, dict]]:
    """Endless ``(args, kwargs)`` of the model's training calls."""
    if batches is None:
        return itertools.repeat((args, kwargs))

    def cycle():
        while True:
            empty = True
            for item in batches:
                empty = False
                yield batch_call(item)
            if empty:
                raise ValueError("batches is empty")

    return cycle()


def _run(svi: SVI, calls: Iterator, steps: int, phase: str, history: Dict[str, list],
         record: Callable[[], Tuple[float, float, float]], progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"VIKING {phase}", disable=not progress, leave=False)
    for _ in bar:
        a, kw = next(calls)
        loss = svi.step(*a, **kw)
        im, ker, prior = record()
        for key, value in zip(("phase", "loss", "image_scale", "kernel_scale", "prior_scale"),
                              (phase, loss, im, ker, prior)):
            history[key].append(value)
        if bar.n % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", sigma_im=f"{im:.3g}", sigma_ker=f"{ker:.3g}")


def _prior_scale_name(model: Callable, prior_scale_param: Optional[str]) -> Optional[str]:
    if prior_scale_param is not None:
        return prior_scale_param
    return getattr(model, "prior_scale_name", None)  # pyro_viking.bnn models expose it


class _WeightPrior(Messenger):
    """Multiply the log density of every latent (non-observed) sample site by ``weight``:
    under ``AutoDelta`` the MAP loss becomes ``−log p(y | θ) − weight · log p(θ)``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.weight


def _hide(fn: Callable, name: Optional[str]) -> Callable:
    """``fn`` with the ``pyro.param`` ``name`` hidden from SVI (so no optimiser moves it)."""
    return fn if name is None else poutine.block(fn, hide=[name])


def _with_scale_lr(optim: PyroOptim, factor: float, is_scale: Callable[[str], bool]) -> PyroOptim:
    """A copy of ``optim`` whose learning rate is multiplied by ``factor`` for scale params."""
    base = optim.pt_optim_args

    def args(name: str) -> dict:
        a = dict(base(name) if callable(base) else base)
        if is_scale(name) and "lr" in a:
            a["lr"] = a["lr"] * factor
        return a

    return PyroOptim(optim.pt_optim_constructor, args, optim.pt_clip_args)


# -- the phases ----------------------------------------------------------------------------------
def _init_loc_fn(model: Callable, init_loc_fn: Optional[Callable]) -> Callable:
    if init_loc_fn is not None:
        return init_loc_fn
    return getattr(model, "init_loc_fn", None) or init_to_median  # BayesianNetwork: its weights


def fit_map(model: Callable, *args, batches: Optional[Iterable] = None, num_steps: int = 1000,
            optim: Optional[PyroOptim] = None, prior_scale_param: Optional[str] = None,
            prior_weight: float = 1.0, init_loc_fn: Optional[Callable] = None,
            progress: bool = True, history: Optional[Dict[str, list]] = None,
            **kwargs) -> Dict[str, torch.Tensor]:
    """MAP by SVI with :class:`~pyro.infer.autoguide.AutoDelta`; returns ``{site: θ̂}``.

    The loss is ``−log p(y | θ) − prior_weight · log p(θ)``. With ``prior_weight = β`` its
    minimiser is the mean the β-tempered ELBO prefers (the ELBO's ``β α ‖θ̂‖²/2``), up to
    the curvature term ``½ tr(HΣ)``. The ``pyro.param`` named ``prior_scale_param`` (a learned
    prior scale) is not optimised. ``init_loc_fn``: where the MAP starts (default: the model's
    own ``init_loc_fn``, e.g. a :class:`~pyro_viking.BayesianNetwork`'s initialised weights,
    else Pyro's ``init_to_median``; the prior median of zero-mean weights is a near-zero
    network, which trains much worse than PyTorch's initialisation).
    """
    name = _prior_scale_name(model, prior_scale_param)
    target = _hide(model, name)
    if prior_weight != 1.0:
        target = _WeightPrior(prior_weight)(target)
    guide = AutoDelta(_hide(model, name), init_loc_fn=_init_loc_fn(model, init_loc_fn))
    svi = SVI(target, guide, optim or pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    history = history if history is not None else _new_history()
    nan = float("nan")
    prior = (lambda: float(pyro.param(name).detach())) if name else (lambda: nan)
    _run(svi, _calls(args, kwargs, batches), num_steps, "map", history,
         lambda: (nan, nan, prior()), progress)
    first = batch_call(next(iter(batches))) if batches is not None else (args, kwargs)
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in guide.median(*first[0], **first[1]).items()}


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
    :mod:`pyro_viking.scale_init`); returns ``(scales, statistics)``.

    With a learned prior scale (``prior_scale_param``, or a model's ``prior_scale_name``) the
    prior precision is optimised as well; otherwise the model's fixed isotropic prior scale is
    read from its trace. ``statistics`` reuses an earlier estimate (e.g. across β).
    """
    name = _prior_scale_name(model, prior_scale_param)
    if statistics is None:
        statistics = curvature_statistics(model, map_values, *args, batches=batches,
                                          num_batches=num_batches,
                                          num_label_samples=num_label_samples, **kwargs)
    fixed = None
    if name is None:
        first = batch_call(next(iter(batches))) if batches is not None else (args, kwargs)
        fixed = _fixed_prior_scale(model, first[0], first[1], map_values)
        if fixed is None:
            raise ValueError("the curvature start needs an isotropic Normal prior (one scale for "
                             "every latent); pass init_scales=False and set the scales yourself")
    scales = optimal_scales(statistics, beta, prior_scale=fixed, kernel=kernel)
    if fixed is not None and kernel == "prior":
        _warn_if_prior_too_wide(statistics, beta, fixed)
    return scales, statistics


#: rows per network call of :func:`set_noise_scale_at_map`
NOISE_CHUNK_ROWS = 4096


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
    with torch.no_grad():
        for a, kw in calls:
            x, y = a[0], (a[1] if len(a) > 1 else kw.get("y"))
            for i in range(0, len(x), NOISE_CHUNK_ROWS):
                out = model.forward_network(latent, x[i:i + NOISE_CHUNK_ROWS])
                r = out.reshape(out.shape[0], -1) - y[i:i + NOISE_CHUNK_ROWS].reshape(
                    out.shape[0], -1).to(out.dtype)
                total += float(r.double().pow(2).sum())
                count += r.numel()
    sigma = math.sqrt(total / count) if count else math.nan
    if not (math.isfinite(sigma) and sigma > 0):
        return None  # no data, an exact or a diverged fit: leave the learned value
    _set_positive_param(name, sigma, like=next(iter(latent.values())))
    return sigma


def _set_positive_param(name: str, value: float, like: torch.Tensor) -> None:
    """Set the positive ``pyro.param`` ``name`` to ``value`` in the param store (created with
    ``like``'s dtype and device when the model has not run yet, e.g. MAP values given)."""
    store = pyro.get_param_store()
    if name in store:
        old = store[name]
        store[name] = torch.tensor(value, dtype=old.dtype, device=old.device)
        store[name].unconstrained().grad = None
    else:
        pyro.param(name, torch.tensor(value, dtype=like.dtype, device=like.device),
                   constraint=constraints.positive)


#: ``fit_viking`` warns when σ_ker, tied to a fixed prior scale ``s``, exceeds this multiple of
#: the kernel scale the linearised ELBO prefers at the MAP (measured: a 5-300-300-3 relu BNN with
#: ``s = 1`` predicted 0.32 accuracy (the majority class: 0.50) at 14.5× the preferred scale;
#: ``s = 0.1``, 1.75×, predicted 0.87, ``s = 0.03``, 1.07×, 0.94)
WIDE_PRIOR_FACTOR = 5.0


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


def _new_history() -> Dict[str, list]:
    return {k: [] for k in ("phase", "loss", "image_scale", "kernel_scale", "prior_scale")}


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
    **kwargs,
) -> VikingFit:
    """Fit an :class:`~pyro_viking.AutoViking` guide to ``model`` with the VIKING recipe.

    :param model: a Pyro model; ``model(*args, **kwargs)`` (or each of ``batches``) is one step.
    :param batches: an iterable of batches instead of ``args``/``kwargs`` (module docstring).
    :param num_steps: SVI steps of the full ELBO phase. ``0`` gives the posterior at the
        (tempered) MAP with the curvature scales of phase 2, set up and ready for
        ``Predictive``: no training under sampled weights (a post-hoc VIKING, as a Laplace
        approximation is post-hoc).
    :param warmup_steps: MAP steps (default ``num_steps // 4``; 0 with ``map_values``).
    :param scales_steps: steps of the optional scales-only phase (``θ̂`` frozen).
    :param beta: KL weight of :class:`~pyro_viking.TraceViking_ELBO` (:data:`DEFAULT_BETA`).
    :param optim: any Pyro optimiser (default ``Adam(lr=1e-3)``), used in every phase.
    :param scales_lr_factor: multiply the learning rate of σ_im, σ_ker and the learned prior
        scale by this factor (needs an optimiser built from a dict or callable with ``lr``).
    :param prior_scale_param: name of a ``pyro.param`` holding the prior's standard deviation
        (a learned prior scale read by the model's priors); found on ``pyro_viking.bnn``
        models automatically. ``None`` and no such attribute: the prior scale is fixed.
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
        the curvature estimate (:func:`~pyro_viking.scale_init.curvature_statistics`).
    :param progress: tqdm progress bars.
    """
    optim = optim or pyro.optim.Adam({"lr": 1e-3})
    name = _prior_scale_name(model, prior_scale_param)
    history = _new_history()
    if map_values is None:
        warmup = num_steps // 4 if warmup_steps is None else warmup_steps
        map_values = fit_map(model, *args, batches=batches, num_steps=warmup, optim=optim,
                             prior_scale_param=name, init_loc_fn=init_loc_fn,
                             progress=progress, history=history,
                             prior_weight=beta if temper_warmup else 1.0, **kwargs)
    if init_scales:
        set_noise_scale_at_map(model, map_values, *args, batches=batches,
                               num_batches=curvature_batches, **kwargs)
        init, statistics = initial_scales(
            model, map_values, *args, beta=beta, batches=batches, prior_scale_param=name,
            kernel=kernel_scale, statistics=statistics, num_batches=curvature_batches,
            num_label_samples=num_label_samples, **kwargs)
        if name is not None:
            _set_positive_param(name, init["prior_scale"],
                                like=next(iter(map_values.values())))
    else:
        init = {"image_scale": init_image_scale, "kernel_scale": float("nan"),
                "prior_scale": float(pyro.param(name).detach()) if name else float("nan")}
    options = dict(init_image_scale=init["image_scale"], kernel_scale=kernel_scale, gamma=gamma,
                   grad_through_projection=False)
    if kernel_scale == "learned" and init_scales:
        options["init_kernel_scale"] = init["kernel_scale"]
    options.update(guide_options or {})
    guide = AutoViking(model, init_loc_fn=init_to_value(values=map_values), **options)
    elbo = TraceViking_ELBO(beta=beta, num_particles=num_particles)
    nan = float("nan")

    def record():
        prior = float(pyro.param(name).detach()) if name else nan
        return float(guide.image_scale.detach()), float(guide.kernel_scale), prior

    calls = _calls(args, kwargs, batches)
    if scales_lr_factor is not None:
        scale_names = {name} if name else set()
        optim = _with_scale_lr(optim, scales_lr_factor, lambda n: n in scale_names or n.endswith(
            ("image_scale", "kernel_scale", "kernel_scale_unconstrained")))
    if scales_steps:
        frozen = poutine.block(guide, hide_fn=lambda msg: msg["type"] == "param"
                               and msg["name"].endswith(".loc"))
        _run(SVI(model, frozen, optim, elbo), calls, scales_steps, "scales", history, record,
             progress)
    _run(SVI(model, guide, optim, elbo), calls, num_steps, "elbo", history, record, progress)
    if guide.prototype_trace is None:  # no ELBO step: set the guide up on one training call
        a, kw = next(calls)
        with poutine.block():
            guide(*a, **kw)
    return VikingFit(guide=guide, history=history, statistics=statistics, init=init,
                     map_values=map_values, beta=beta)

