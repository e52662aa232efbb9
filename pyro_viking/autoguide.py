"""``AutoViking``: the VIKING posterior as a drop-in Pyro autoguide.

Every continuous latent is flattened into ``z ∈ R^D`` (unconstrained space, as in Pyro's
``AutoContinuous``) and ``q(z) = N(θ̂, σ_ker² P + σ_im² (I − P))`` with ``P`` the projector onto
the kernel of the Jacobian of the per-datum log-likelihoods (or outputs) of the current call's
data at ``θ̂``. Training draws follow the stochastic alternating projections of
:class:`~pyro_viking.sampling.SamplingState`. Prediction (``poutine.get_mask() is False``, as under
:class:`~pyro.infer.Predictive`) never projects on the prediction inputs: it draws from samples
projected on the *training* data — by :meth:`AutoViking.project_training_data`, or lazily by the
guide itself on the first prediction after training when every training call carried the same
data (the whole data set, possibly subsampled by the model's plate).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterable, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import biject_to, constraints

from .distributions import RANK_ESTIMATORS, KernelImageNormal
from .jacobian_backends import ProjectorBuilder
from .model_inspection import (
    ModelCall,
    check_no_subsampled_latents,
    inspect_model,
    shape_signature,
    strip_blocks,
)
from .model_likelihood import LatentLayout, trace_model
from .priors import isotropic_prior_scale, prior_scale_param, typical_prior_scale
from .sampling import PredictionPosterior, SamplingState, VikingPosterior

__all__ = ["AutoViking"]

_KERNEL_SCALES = ("auto", "prior", "learned")
#: samples the guide projects at once when it projects lazily for prediction
LAZY_NUM_SAMPLES = 100


class AutoViking(AutoContinuous):
    """VIKING guide over all continuous latents of ``model``.

    :param init_loc_fn: per-site initialisation of ``θ̂`` (e.g. ``init_to_value`` of a MAP fit).
    :param init_image_scale: initial ``σ_im``.
    :param kernel_scale: ``"prior"`` ties ``σ_ker`` to the common ``Normal`` prior scale of the
        latents (a ``pyro.param`` scale is followed and gets gradients), ``"learned"`` makes it
        a parameter, ``"auto"`` ties when possible, else learns; a float fixes it.
    :param init_kernel_scale: initial learned ``σ_ker`` (default: the prior scales' RMS, else 1).
    :param gamma: memory ``γ ∈ [0, 1]`` of the stochastic alternating projections.
    :param jacobian: ``"loss"`` (per-datum log-likelihoods) or ``"output"``.
    :param backend, solver, solver_options: see :class:`~pyro_viking.jacobian_backends.
        ProjectorBuilder`.
    :param grad_through_projection: differentiate the samples through ``P(θ̂)`` (implicit
        differentiation, the paper's default); ``False`` stops that gradient.
    :param rank_estimator: how ``dim ker`` enters the KL (:data:`~pyro_viking.distributions.
        RANK_ESTIMATORS`).
    :param image_noise: ``"fresh"``: the image part is a fresh draw of ``N(0, I − P_t)``
        (covariance exactly ``σ_im² (I − P_t)``, as the KL assumes); ``"carried"``: the paper's
        ``e − P_t e``, whose variance is only ``(1 − γ) σ_im²`` when consecutive kernels agree.
    :param num_chains: carried kernel samples for sequential particles (set by
        :class:`~pyro_viking.TraceViking_ELBO` to its ``num_particles``).
    """

    def __init__(self, model: Callable, *, init_loc_fn: Callable = init_to_median,
                 init_image_scale: float = 0.1, kernel_scale="auto",
                 init_kernel_scale: Optional[float] = None, gamma: float = 0.5,
                 jacobian: str = "loss", backend: str = "auto", solver: str = "auto",
                 solver_options: Optional[dict] = None, grad_through_projection: bool = True,
                 rank_estimator: str = "auto", image_noise: str = "fresh", num_chains: int = 1):
        fixed = isinstance(kernel_scale, (int, float))
        for ok, what in ((0.0 <= float(gamma) <= 1.0, f"gamma must lie in [0, 1], got {gamma}"),
                         (image_noise in ("fresh", "carried"), f"image_noise: {image_noise!r}"),
                         (fixed or kernel_scale in _KERNEL_SCALES,
                          f"kernel_scale must be a float or one of {_KERNEL_SCALES}"),
                         (not fixed or kernel_scale > 0, "kernel_scale must be positive"),
                         (rank_estimator in RANK_ESTIMATORS, f"rank_estimator: {rank_estimator!r}"),
                         (init_image_scale > 0 and (init_kernel_scale or 1) > 0,
                          "image_scale and init_kernel_scale must be positive")):
            if not ok:
                raise ValueError(what)
        self._builder = ProjectorBuilder(jacobian=jacobian, backend=backend, solver=solver,
                                         solver_options=solver_options)
        self._state = SamplingState(gamma, image_noise, int(num_chains))
        self._raw_model = (model,)
        self.init_image_scale, self.init_kernel_scale = float(init_image_scale), init_kernel_scale
        self.kernel_scale_mode, self.gamma, self.jacobian = kernel_scale, float(gamma), jacobian
        self.grad_through_projection = grad_through_projection
        self.rank_estimator, self.image_noise = rank_estimator, image_noise
        self.last_projector = None
        self._call, self._calls, self._warned = ModelCall(), {}, set()
        super().__init__(model, init_loc_fn=init_loc_fn)

    # -- set-up and per-call facts ----------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.layout = LatentLayout.from_trace(self.prototype_trace)
        check_no_subsampled_latents(self.prototype_trace, self.layout.names)
        self._call = self._inspect(args, kwargs, predicting=False)
        init_loc = self._init_loc()
        like = dict(dtype=init_loc.dtype, device=init_loc.device)
        self.loc = PyroParam(init_loc)
        self.image_scale = PyroParam(torch.tensor(self.init_image_scale, **like),
                                     constraints.positive)
        prior = isotropic_prior_scale(self.prototype_trace, self.layout.names)
        mode = self.kernel_scale_mode
        if mode == "prior" and prior is None:
            raise ValueError("kernel_scale='prior' needs every latent to have a Normal prior with "
                             "real support and one common scale; this model's priors differ. "
                             "Use kernel_scale='learned' (or a float).")
        mode = ("prior" if prior is not None else "learned") if mode == "auto" else mode
        self._kernel_mode = mode if isinstance(mode, str) else "fixed"
        if self._kernel_mode == "learned":
            init = self.init_kernel_scale or (None if prior is None else float(prior.detach())) \
                or typical_prior_scale(self.prototype_trace, self.layout.names) or 1.0
            self.kernel_scale_unconstrained = PyroParam(torch.tensor(float(init), **like),
                                                        constraints.positive)
        self._fixed_scale = torch.tensor(float(mode), **like) if self._kernel_mode == "fixed" \
            else None
        self._last_prior = None if prior is None else prior.detach()
        self._prior_param = None
        if prior is not None and prior.requires_grad:
            with torch.random.fork_rng(devices=[]):
                self._prior_param = prior_scale_param(
                    trace_model(self._raw_model[0], args, kwargs, {}), prior)

    @property
    def _jac_model(self) -> Callable:
        """The model whose Jacobian is taken (outer ``poutine.block`` wrappers removed)."""
        if self._raw_model is None:
            raise RuntimeError("this AutoViking was loaded without its model (saving drops it): "
                               "call guide.set_model(model) before training or projecting")
        return strip_blocks(self._raw_model[0])

    def _inspect(self, args, kwargs, predicting: bool) -> ModelCall:
        key = (shape_signature(args, kwargs), predicting)
        if key not in self._calls and self._raw_model is not None:
            call = inspect_model(self._jac_model, args, kwargs, self.layout,
                                 training=not predicting)
            if not call.has_observations:
                self._warn_once("no_obs", "the model has no observed sites: without a "
                                "likelihood the kernel is the whole space, q = N(loc, σ_ker² I)")
            self._calls[key] = call
        return self._calls.get(key, ModelCall())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _create_plates(self, *args, **kwargs):
        if getattr(self, "_plates_ready", False):
            return self.plates  # already created by this call's forward
        plates = super()._create_plates(*args, **kwargs)
        if self.master is None:  # the data plates of this call, with their current sizes
            for name, frame in sorted(self._call.data_frames.items()):
                plates.setdefault(name, pyro.plate(name, frame.full_size, dim=frame.dim,
                                                   subsample_size=frame.size))
        return plates

    def forward(self, *args, **kwargs):
        if torch._C._get_tracing_state():
            raise NotImplementedError("AutoViking cannot be JIT-traced (JitTrace_ELBO): its "
                                      "projection runs Python control flow; use "
                                      "TraceViking_ELBO or Trace_ELBO")
        predicting = poutine.get_mask() is False
        if self.prototype_trace is None:
            if predicting:
                raise RuntimeError("AutoViking has not seen the training data: train it (SVI) "
                                   "or call guide(*training_args) before predicting")
            self._setup_prototype(*args, **kwargs)
        self._call = self._inspect(args, kwargs, predicting)
        self._create_plates(*args, **kwargs)
        self._plates_ready = True  # plates first: their subsample indices serve the projection
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._plates_ready = False

    def _unpack_latent(self, latent: Tensor):
        """``(site, unconstrained value)`` pairs from one ``split`` (see :meth:`LatentLayout.
        split`), shaped as :meth:`AutoContinuous._unpack_latent` shapes them."""
        batch = latent.shape[:-1]
        for s, part in zip(self.layout.sites, self.layout.split(latent)):
            event_dim = s.event_dim + len(s.unconstrained_shape) - len(s.shape)
            shape = torch.broadcast_shapes(s.unconstrained_shape, batch + (1,) * event_dim)
            yield self.prototype_trace.nodes[s.name], part.view(shape)

    # -- scales ------------------------------------------------------------------------------------
    def _kernel_scale_now(self, args, kwargs, predicting: bool) -> Tensor:
        mode = self._kernel_mode
        if mode != "prior":
            return self.kernel_scale_unconstrained if mode == "learned" else self._fixed_scale
        if self._prior_param is not None and self._prior_param in pyro.get_param_store():
            s = pyro.param(self._prior_param)
        elif (predicting or not self._last_prior.requires_grad) and self._last_prior is not None:
            return self._last_prior  # a constant prior scale, or no gradient needed
        else:  # a prior scale computed from parameters: read it from a model run
            with torch.random.fork_rng(devices=[]):
                trace = trace_model(self._raw_model[0], args, kwargs, {})
            s = isotropic_prior_scale(trace, self.layout.names)
        self._last_prior = s.detach() if predicting else s
        return s

    @property
    def kernel_scale(self) -> Tensor:
        """``σ_ker`` (detached; a tied ``pyro.param`` prior scale at its current value)."""
        if self.prototype_trace is None:
            raise RuntimeError("AutoViking is not set up yet: train it or call guide(*args)")
        with torch.no_grad():
            return self._kernel_scale_now((), {}, predicting=True).detach()

    @property
    def backend_used(self) -> Optional[str]:
        """The Jacobian backend chosen at the first projection (``None`` before)."""
        return self._builder.backend_used

    @property
    def last_draw(self):
        """``(e, Pe)`` ``(n, D)`` of the last training draw (before / after projection)."""
        return self._state.last

    @property
    def num_chains(self) -> int:
        return self._state.num_chains

    @num_chains.setter
    def num_chains(self, value: int) -> None:
        self._state.num_chains = int(value)

    # -- the posterior -----------------------------------------------------------------------------
    def get_posterior(self, *args, **kwargs):
        predicting = poutine.get_mask() is False
        loc, si = self.loc, self.image_scale
        sk = self._kernel_scale_now(args, kwargs, predicting)
        if not all(bool(torch.isfinite(t.detach().sum())) for t in (loc, si, sk)):
            raise ValueError("AutoViking's parameters are not finite (loc, image_scale or "
                             "kernel_scale is NaN/inf): training diverged. Lower the learning "
                             "rate (or clip gradients, e.g. ClippedAdam) and start again.")
        if predicting:
            n = math.prod(f.size for f in poutine.runtime.get_plates())
            self._refresh_prediction_samples(n)
            return PredictionPosterior(loc, sk, si, state=self._state, layout=self.layout)
        self._state.note_training_call(args, kwargs)
        self.last_projector = self._projector(args, kwargs, self._subsample_indices(),
                                              differentiable=self.grad_through_projection,
                                              training=True)
        return VikingPosterior(loc, sk, si, self.last_projector, state=self._state,
                               layout=self.layout, rank_estimator=self.rank_estimator,
                               validate_args=False)

    def _refresh_prediction_samples(self, n: int) -> None:
        """Lazy projection: on the training data, when they are known and the cached samples
        are missing, stale or (when the guide made them) used up."""
        data = self._state.training_data
        if self._state.needs_projection(n) and data is not None and self._raw_model is not None:
            with torch.enable_grad(), poutine.mask(mask=True):
                self._project(*data, None, max(n, LAZY_NUM_SAMPLES), 1, False, lazy=True)

    def _subsample_indices(self) -> Dict[str, Tensor]:
        plates = getattr(self, "plates", {})
        indices = {name: getattr(plates.get(name), "_indices", None)
                   for name in self._call.data_frames}
        return {name: idx for name, idx in indices.items() if idx is not None}

    def _projector(self, args, kwargs, subsample, *, differentiable: bool, training=False):
        call = self._inspect(args, kwargs, predicting=False)
        if not call.has_observations:
            return ProjectorBuilder.identity(self.latent_dim, self.loc)
        condition = None
        if call.extra_latents:  # other guides' latents: at their medians, not prior draws
            if self.master is None:
                self._warn_once("extra", f"latents {sorted(call.extra_latents)} are hidden from "
                                "AutoViking: its Jacobian uses prior draws of them. Guide them "
                                "with AutoGuideList so that their medians are used.")
            else:
                median, condition = {}, {}
                with poutine.block():  # AutoDelta.median runs its guide
                    for part in self.master():
                        if part is not self:
                            if part.prototype_trace is None:  # runs after this part
                                part._setup_prototype(*args, **kwargs)
                            median.update(part.median(*args, **kwargs))
                for name, frames in call.extra_latents.items():
                    if name in median:
                        value = median[name]
                        for dim, plate in frames:
                            value = value.index_select(dim, subsample[plate])
                        condition[name] = value
        return self._builder.build(self._jac_model, self.layout, args, kwargs, self.loc,
                                   subsample=subsample, condition=condition,
                                   differentiable=differentiable, training=training)

    # -- full passes over the training data ---------------------------------------------------------
    def project_training_data(self, *args, batches: Optional[Iterable] = None,
                              num_samples: int = 100, num_passes: int = 1, progress: bool = False,
                              refresh_training_state: bool = False, **kwargs) -> Tensor:
        """Project ``num_samples`` fresh samples onto the kernel of the *whole* training set's
        Jacobian by alternating projections ``k ← P_b k`` over its batches, ``num_passes``
        times (von Neumann: converges to the full-data projection), and cache ``(ε, k)`` for
        every later prediction. ``args, kwargs``: the model's training arguments (a subsampled
        data plate is walked in order, in chunks of its subsample size, the last chunk wrapping
        around); or ``batches``: an iterable of argument tuples, ``(args, kwargs)`` pairs or
        kwargs dicts (e.g. a ``DataLoader``). ``refresh_training_state`` also restarts the
        training chains from these samples. Returns the kernel samples ``(S, D)``."""
        if self.prototype_trace is None:
            if batches is not None:
                raise RuntimeError("call the guide once (e.g. one SVI step) before "
                                   "project_training_data(batches=...)")
            self._setup_prototype(*args, **kwargs)
        k = self._project(args, kwargs, batches, num_samples, num_passes, progress, lazy=False)
        if refresh_training_state:
            self._state.chains = {num_samples: __import__("collections").deque([k.clone()])}
        return k

    def _project(self, args, kwargs, batches, num_samples, num_passes, progress, *, lazy):
        loc = self.loc.detach()
        e = torch.randn(num_samples, self.latent_dim, dtype=loc.dtype, device=loc.device)
        k = e.clone()
        work = [b for _ in range(num_passes) for b in self._iter_batches(args, kwargs, batches)]
        if progress:
            from tqdm.auto import tqdm

            work = tqdm(work, desc="projecting on training data", unit="batch")
        for a, kw, sub in work:
            proj = self._projector(a, kw, sub, differentiable=False)
            with torch.no_grad():
                k = proj(k)
        self._state.set_prediction_samples(e, k, lazy=lazy)
        return k

    def _iter_batches(self, args, kwargs, batches):
        if batches is not None:
            for item in batches:
                if isinstance(item, dict):
                    yield (), item, {}
                elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) \
                        and isinstance(item[0], tuple):
                    yield item[0], item[1], {}
                else:
                    yield (tuple(item) if isinstance(item, (tuple, list)) else (item,)), {}, {}
            return
        frames = self._inspect(args, kwargs, predicting=False).data_frames
        if len(frames) > 1:
            raise ValueError(f"the model subsamples several data plates {sorted(frames)}; pass "
                             "batches=[...] explicitly")
        if not frames:
            yield args, kwargs, {}
        for name, frame in frames.items():
            for start in range(0, frame.full_size, frame.size):
                idx = torch.arange(start, start + frame.size, device=self.loc.device)
                yield args, kwargs, {name: idx % frame.full_size}

    @property
    def projected_samples(self):
        """``(ε, Pε)`` ``(S, D)`` projected on the training data (``None`` before): a posterior
        sample is ``loc + σ_ker Pε + σ_im (ε − Pε)``."""
        st = self._state
        return None if st.noise is None else (st.noise, st.kernel)

    # -- Pyro's Gaussian-guide interface ------------------------------------------------------------
    @torch.no_grad()
    def median(self, *args, **kwargs) -> Dict[str, Tensor]:
        """Posterior median (= mean ``θ̂``) of each latent, in constrained space."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {s.name: v for s, v in zip(self.layout.sites, [
            site["fn"].support and biject_to(site["fn"].support)(u)
            for site, u in self._unpack_latent(self.loc.detach())])}

    def _loc_scale(self, *args, **kwargs):
        """``(loc, marginal std)``, ``std² = σ_im² + (σ_ker² − σ_im²) diag P``: ``diag P`` exact
        for the given call's data, else estimated from samples projected on the training data."""
        if self.prototype_trace is None:
            if not (args or kwargs):
                raise RuntimeError("AutoViking is not set up yet: train it (or pass the model's "
                                   "arguments) before asking for quantiles")
            self._setup_prototype(*args, **kwargs)
        loc, sk, si = self.loc.detach(), self.kernel_scale, self.image_scale.detach()
        if args or kwargs:
            if self._inspect(args, kwargs, predicting=False).data_frames:
                raise ValueError("the model subsamples its data plate, so one call's data are a "
                                 "random minibatch; call guide.quantiles(q) without arguments")
            q = KernelImageNormal(loc, sk, si, self._projector(args, kwargs, None,
                                                               differentiable=False))
        else:
            self._refresh_prediction_samples(0)
            q = PredictionPosterior(loc, sk, si, state=self._state, layout=self.layout)
        return loc, q.variance.sqrt()

    def __getstate__(self):
        # Pyro's AutoGuide.__getstate__ clears the model on the live object: copy instead (and
        # drop the weakrefs that constrained parameter values keep, as PyroModule does).
        for param in self.parameters(recurse=True):
            param.__dict__.pop("unconstrained", None)
        return {**self.__dict__, "_model": None, "_raw_model": None, "master": None,
                "last_projector": None}

    def set_model(self, model: Callable) -> None:
        """Re-attach the model after loading (training and projections need it)."""
        self._raw_model = self._model = (model,)
