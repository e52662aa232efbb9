"""``AutoViking``: the VIKING posterior as a drop-in Pyro autoguide.

The guide flattens every continuous latent of the model into ``z ∈ R^D`` (unconstrained space,
Pyro's ``AutoContinuous`` convention) and uses

    q(z) = N(θ̂, σ_ker² P + σ_im² (I − P)),

with ``P`` the projector onto the kernel of the Jacobian of the per-datum log-likelihoods
(or outputs) of the *current call's data* at ``θ̂``. Between training calls it carries one
kernel sample per particle and applies the stochastic alternating-projection update

    e = √γ k + √(1−γ) η,  k ← P_t e,  z = θ̂ + σ_ker k + σ_im i,  i ~ N(0, I − P_t),

with ``i`` drawn independently of ``k`` (the paper's image part ``e − P_t e`` is available as
``image_noise="carried"``).

Prediction (``poutine.get_mask() is False``, as under :class:`~pyro.infer.Predictive`) never
projects on the prediction inputs: it uses samples projected on the *training* data by
:meth:`AutoViking.project_training_data` (or, failing that, the last training samples).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Callable, Dict, Iterable, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import biject_to, constraints

from .distributions import KernelImageNormal
from .distributions.kernel_image_normal import RANK_ESTIMATORS
from .jacobian_backends import BACKENDS, build_projector
from .linalg import DenseJacobian, KernelProjector
from .linalg.projectors import _SOLVERS as SOLVERS
from .model_likelihood import (
    LatentLayout,
    _trace_model,
    check_observations,
    observed_data_frames,
)
from .priors import isotropic_prior_scale

__all__ = ["AutoViking"]

_KERNEL_SCALES = ("auto", "prior", "learned")


def _shape_signature(args, kwargs) -> tuple:
    """Hashable summary of the arguments: tensor shapes, plain scalar values, type names."""

    def sig(v):
        if torch.is_tensor(v):
            return tuple(v.shape)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return type(v).__name__

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


class _TrainingDataProjector(KernelProjector):
    """Stand-in projector of the prediction posterior: its draws come from samples projected on
    the training data, so no projection on the prediction inputs is ever computed."""

    def __init__(self, D: int, like: Tensor):
        super().__init__(DenseJacobian(torch.zeros(1, D, dtype=like.dtype, device=like.device)))

    def __call__(self, E: Tensor) -> Tensor:
        raise NotImplementedError(
            "the prediction-mode AutoViking posterior has no projector of its own (its samples "
            "come from guide.project_training_data); evaluate densities in training mode")


class _VikingPosterior(KernelImageNormal):
    """A :class:`KernelImageNormal` whose draws follow the guide's sampling scheme
    (carried kernel samples during training, training-data samples during prediction)."""

    def __init__(self, *args, guide: AutoViking, **kwargs):
        super().__init__(*args, **kwargs)
        self._guide = guide

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_VikingPosterior, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._guide = self._guide
        return new

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        n = math.prod(shape[:-1])
        k, img = self._guide._draw(self, n)
        k, img = k.reshape(shape), img.reshape(shape)
        value = self.compose(k, img)
        self._draw_cache = (value, k, img)
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        """As :meth:`KernelImageNormal.log_prob`; for this distribution's own last draw
        ``z = loc + σ_ker k + σ_im i`` (k in the kernel, i in the image) the Mahalanobis term
        is ``‖k‖² + ‖i‖²`` — the same function of the parameters, without projecting again."""
        cache = getattr(self, "_draw_cache", None)
        if cache is None or value is not cache[0]:
            return super().log_prob(value)
        _, k, img = cache
        D = self.event_shape[0]
        maha = (k ** 2).sum(-1) + (img ** 2).sum(-1)
        return -0.5 * (maha + self.log_det_covariance() + D * math.log(2 * math.pi))


class AutoViking(AutoContinuous):
    """VIKING guide over all continuous latents of ``model``.

    :param model: a Pyro model with at least one observed site.
    :param init_loc_fn: per-site initialisation of ``θ̂`` (e.g. ``init_to_value`` of a MAP fit).
    :param init_image_scale: initial ``σ_im``.
    :param kernel_scale: ``"prior"`` ties ``σ_ker`` to the prior scale (requires the same
        ``Normal`` scale on every latent with real support; a ``pyro.param`` prior scale is
        followed and gets gradients), ``"learned"`` makes ``σ_ker`` a free parameter, ``"auto"``
        ties when possible, else learns. A float fixes ``σ_ker``.
    :param init_kernel_scale: initial ``σ_ker`` when learned (default: the common prior scale
        when the latents share one, else 1).
    :param gamma: memory ``γ ∈ [0, 1]`` of the stochastic alternating projections.
    :param jacobian: ``"loss"`` (per-datum log-likelihoods) or ``"output"``.
    :param backend: Jacobian backend, ``"auto"``, ``"layer_gram"``, ``"per_example"`` or
        ``"matrix_free"`` (see :func:`~pyro_viking.jacobian_backends.build_projector`).
    :param solver: Gram solver, ``"auto"``, ``"eigh"``, ``"cholesky"`` or ``"cg"``.
    :param solver_options: CG options (``rtol``, ``atol``, ``maxiter``, ``reorthogonalize``).
    :param grad_through_projection: differentiate the samples through ``P(θ̂)`` (implicit
        differentiation; the paper's default). ``False`` stops that gradient (cheaper).
    :param rank_estimator: how ``dim ker`` enters the KL: ``"auto"``, ``"exact"``,
        ``"hutchinson"`` or ``"image"`` (see :data:`~pyro_viking.distributions.RANK_ESTIMATORS`).
    :param image_noise: ``"fresh"`` (default): the image part is a fresh draw of
        ``N(0, I − P_t)``, so its covariance is exactly ``σ_im² (I − P_t)`` as the KL assumes.
        With a direct solver, the exact rank and ``grad_through_projection=False`` it is
        ``c J`` with ``c ~ N(0, (J Jᵀ)⁻¹)`` from the Gram's factorisation (it shares the kernel
        part's ``rmv``); otherwise ``η − P_t η`` for fresh noise η. ``"carried"``: the paper's
        ``e − P_t e``, whose image variance is only ``(1 − γ) σ_im²`` when consecutive batches
        have similar kernels, so the learned ``σ_im`` then overstates the spread by up to
        ``1/√(1 − γ)``.
    :param num_chains: number of carried kernel samples for sequential particles (set by
        :class:`~pyro_viking.TraceViking_ELBO` to its ``num_particles``).
    """

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: Callable = init_to_median,
        init_image_scale: float = 0.1,
        kernel_scale="auto",
        init_kernel_scale: Optional[float] = None,
        gamma: float = 0.5,
        jacobian: str = "loss",
        backend: str = "auto",
        solver: str = "auto",
        solver_options: Optional[dict] = None,
        grad_through_projection: bool = True,
        rank_estimator: str = "auto",
        image_noise: str = "fresh",
        num_chains: int = 1,
    ):
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if image_noise not in ("fresh", "carried"):
            raise ValueError(f"image_noise must be 'fresh' or 'carried', got {image_noise!r}")
        if jacobian not in ("loss", "output"):
            raise ValueError(f"jacobian must be 'loss' or 'output', got {jacobian!r}")
        if not isinstance(kernel_scale, (int, float)) and kernel_scale not in _KERNEL_SCALES:
            raise ValueError(f"kernel_scale must be a positive float or one of {_KERNEL_SCALES}, "
                             f"got {kernel_scale!r}")
        if isinstance(kernel_scale, (int, float)) and kernel_scale <= 0:
            raise ValueError(f"kernel_scale must be positive, got {kernel_scale}")
        for name, value, allowed in (("backend", backend, BACKENDS), ("solver", solver, SOLVERS),
                                     ("rank_estimator", rank_estimator, RANK_ESTIMATORS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if init_image_scale <= 0 or (init_kernel_scale is not None and init_kernel_scale <= 0):
            raise ValueError("init_image_scale and init_kernel_scale must be positive, got "
                             f"{init_image_scale} and {init_kernel_scale}")
        self._raw_model = (model,)
        self.init_image_scale = float(init_image_scale)
        self.init_kernel_scale = None if init_kernel_scale is None else float(init_kernel_scale)
        self.kernel_scale_mode = kernel_scale
        self.gamma = float(gamma)
        self.jacobian = jacobian
        self.backend = backend
        self.solver = solver
        self.solver_options = dict(solver_options or {})
        self.grad_through_projection = grad_through_projection
        self.rank_estimator = rank_estimator
        self.image_noise = image_noise
        self.num_chains = int(num_chains)
        self._carry: Dict[int, deque] = {}
        self._last_draw: Dict[int, Tuple[Tensor, Tensor]] = {}
        self._pred_noise: Optional[Tensor] = None
        self._pred_kernel: Optional[Tensor] = None
        self._pred_counter = 0
        self._warned_no_cache = False
        self.last_projector = None
        super().__init__(model, init_loc_fn=init_loc_fn)

    # -- setup ----------------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.layout = LatentLayout.from_trace(self.prototype_trace)
        # The prototype trace hides observed sites; the data plates come from a full trace.
        full_trace = check_observations(self._raw_model[0], args, kwargs)
        self._data_frames = observed_data_frames(full_trace)
        self._checked_signatures = {_shape_signature(args, kwargs)}
        init_loc = self._init_loc()
        self.loc = PyroParam(init_loc)
        self.image_scale = PyroParam(
            torch.tensor(self.init_image_scale, dtype=init_loc.dtype, device=init_loc.device),
            constraints.positive)
        mode = self.kernel_scale_mode
        prior = isotropic_prior_scale(self.prototype_trace, self.layout.names)
        if mode == "auto":
            mode = "prior" if prior is not None else "learned"
        if mode == "prior" and prior is None:
            raise ValueError(
                "kernel_scale='prior' needs every latent to have a Normal prior with real "
                "support and one common scale; this model's priors differ. Use "
                "kernel_scale='learned' (or a float).")
        self._kernel_mode = mode if isinstance(mode, str) else "fixed"
        if self._kernel_mode == "learned":
            init = self.init_kernel_scale
            if init is None:
                init = 1.0 if prior is None else float(prior.detach())
            self.kernel_scale_unconstrained = PyroParam(
                torch.tensor(init, dtype=init_loc.dtype, device=init_loc.device),
                constraints.positive)
        # A constant prior scale is cached; a pyro.param one is re-read from the model each call.
        self._prior_scale_is_param = prior is not None and prior.requires_grad
        self._constant_prior_scale = None if prior is None else prior.detach()

    def _create_plates(self, *args, **kwargs):
        if getattr(self, "_plates_ready", False):
            return self.plates  # already created by this call's forward
        plates = super()._create_plates(*args, **kwargs)
        if self.master is None:
            for name, frame in sorted(getattr(self, "_data_frames", {}).items()):
                if name not in plates:
                    plates[name] = pyro.plate(name, frame.full_size, dim=frame.dim,
                                              subsample_size=frame.size)
        return plates

    def _unpack_latent(self, latent: Tensor):
        """As :meth:`AutoContinuous._unpack_latent` (``(site, unconstrained value)`` pairs),
        with one ``split`` instead of a slice per site: the backward then concatenates the
        sites' gradients in one pass instead of filling a D-sized zero tensor per site."""
        batch_shape = latent.shape[:-1]
        sites = [site for _, site in self.prototype_trace.iter_stochastic_nodes()]
        shapes = [self._unconstrained_shapes[site["name"]] for site in sites]
        sizes = [math.prod(shape) for shape in shapes]
        if sum(sizes) != latent.shape[-1]:
            raise ValueError(f"latent of size {latent.shape[-1]} does not match the model's "
                             f"{sum(sizes)} unconstrained coordinates")
        for site, shape, piece in zip(sites, shapes, latent.split(sizes, dim=-1)):
            event_dim = site["fn"].event_dim + len(shape) - len(site["value"].shape)
            shape = torch.broadcast_shapes(shape, batch_shape + (1,) * event_dim)
            yield site, piece.view(shape)

    # -- read-only views ------------------------------------------------------------------------
    def _current_kernel_scale(self, *args, **kwargs) -> Tensor:
        mode = self._kernel_mode
        if mode == "learned":
            return self.kernel_scale_unconstrained
        if mode == "fixed":
            return torch.tensor(float(self.kernel_scale_mode), dtype=self.loc.dtype,
                                device=self.loc.device)
        if self._prior_scale_is_param:
            trace = self._blocked_model_trace(self.loc, args, kwargs)
            scale = isotropic_prior_scale(trace, self.layout.names)
            self._last_prior_scale = scale.detach()
            return scale
        cached = getattr(self, "_constant_prior_scale", None)
        if cached is None:
            cached = isotropic_prior_scale(self.prototype_trace, self.layout.names).detach()
        return cached

    @property
    def kernel_scale(self) -> Tensor:
        """``σ_ker`` (detached; for a tied ``pyro.param`` prior scale, its current value)."""
        with torch.no_grad():
            if self._kernel_mode == "prior" and self._prior_scale_is_param:
                # A learned prior scale is read from the model at each call; report the last.
                last = getattr(self, "_last_prior_scale", None)
                if last is None:
                    last = isotropic_prior_scale(self.prototype_trace, self.layout.names)
                return last.detach()
            return self._current_kernel_scale().detach()

    def _blocked_model_trace(self, z: Tensor, args, kwargs):
        values = self.layout.unpack(z)
        model = poutine.condition(self._raw_model[0], data=values)
        with poutine.block():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        # Conditioning marks the latents observed; they are still latents (priors read them).
        for name in values:
            trace.nodes[name]["is_observed"] = False
        return trace

    # -- the posterior --------------------------------------------------------------------------
    def _subsample_indices(self) -> Dict[str, Tensor]:
        plates = getattr(self, "plates", {})
        out = {}
        for name in getattr(self, "_data_frames", {}):
            idx = getattr(plates.get(name), "_indices", None)
            if idx is not None:
                out[name] = idx
        return out

    def _projector(self, loc: Tensor, args, kwargs, subsample, *, differentiable: bool,
                   training: bool = False):
        # The first projection picks (and verifies) the backend; later ones reuse the choice.
        backend = getattr(self, "_resolved_backend", None) or self.backend
        options = self.solver_options
        if training and self._skip_refinement_check():
            options = {**options, "refine": 0}
        proj = build_projector(
            self._raw_model[0], self.layout, args, kwargs, loc,
            jacobian=self.jacobian, subsample=subsample, backend=backend,
            solver=self.solver, solver_options=options,
            differentiable=differentiable,
            check=getattr(self, "_resolved_backend", None) is None)
        self._resolved_backend = proj.operator.backend_name
        return proj

    #: training projections between two residual checks once a check found refinement useless
    REFINE_CHECK_INTERVAL = 16

    def _skip_refinement_check(self) -> bool:
        """Whether this training projection skips iterative refinement and its residual check
        (one ``mv``): yes while the last check, fewer than :attr:`REFINE_CHECK_INTERVAL`
        projections ago, found the first pass already within ``refine_tol``."""
        if self.solver_options.get("refine", 1) == 0 \
                or self.solver_options.get("refine_tol", 1.0) == 0:
            return False
        state = self.__dict__.setdefault("_refine_state", {"clean": False, "since": 0})
        state["since"] += 1
        return state["clean"] and state["since"] < self.REFINE_CHECK_INTERVAL

    def _note_refinement(self, proj) -> None:
        state = self.__dict__.get("_refine_state")
        info = proj.info
        if state is None or info is None or proj.refine == 0 or proj.solver == "cg":
            return  # not a checked projection
        state["clean"], state["since"] = info.refinements == 0, 0

    @property
    def backend_used(self) -> Optional[str]:
        """The Jacobian backend chosen at the first projection (``None`` before)."""
        return getattr(self, "_resolved_backend", None)

    def get_posterior(self, *args, **kwargs) -> KernelImageNormal:
        predicting = poutine.get_mask() is False
        if predicting:
            projector = _TrainingDataProjector(self.latent_dim, self.loc)
        else:
            projector = self._projector(self.loc, args, kwargs, self._subsample_indices(),
                                        differentiable=self.grad_through_projection,
                                        training=True)
            self.last_projector = projector
        sk = self._current_kernel_scale(*args, **kwargs)
        # The constructor's own checks (positive scales, finite loc) always run; Pyro's generic
        # argument validation would only repeat them with another pass over D.
        return _VikingPosterior(self.loc, sk, self.image_scale, projector, guide=self,
                                rank_estimator=self.rank_estimator, validate_args=False)

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._check_latent_shapes(args, kwargs)
        # Plates first: the data plates' subsample indices are drawn here, replayed by the
        # model, and used by the projection of this call.
        self._create_plates(*args, **kwargs)
        self._plates_ready = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._plates_ready = False

    def _check_latent_shapes(self, args, kwargs) -> None:
        """Raise a clear ``ValueError`` if the model's latent shapes differ from the set-up ones.

        Runs the model once (blocked, RNG state restored) for each new signature of argument
        shapes, so that the usual calls cost nothing.
        """
        sig = _shape_signature(args, kwargs)
        checked = self.__dict__.setdefault("_checked_signatures", set())
        model = (self._raw_model or (None,))[0]
        if sig in checked or model is None:
            return
        with torch.random.fork_rng(devices=[]):
            trace = _trace_model(model, args, kwargs, {})
        for s in self.layout.sites:
            node = trace.nodes.get(s.name)
            if node is not None and node["type"] == "sample" \
                    and tuple(node["value"].shape) != tuple(s.shape):
                raise ValueError(
                    f"AutoViking was set up with latent '{s.name}' of shape {tuple(s.shape)}, "
                    f"but the model now samples it with shape {tuple(node['value'].shape)}; "
                    "latent shapes must not change between calls (create a new guide).")
        checked.add(sig)

    # -- sampling scheme ------------------------------------------------------------------------
    def _draw(self, q: KernelImageNormal, n: int) -> Tuple[Tensor, Tensor]:
        D = self.latent_dim
        if isinstance(q.projector, _TrainingDataProjector):
            return self._prediction_noise(n)
        eta = torch.randn(n, D, dtype=q.loc.dtype, device=q.loc.device)
        chain = self._carry.setdefault(n, deque())
        k_prev = chain.popleft() if len(chain) >= max(1, self.num_chains) else None
        g = self.gamma
        proj = q.projector
        restart = k_prev is None or g == 0
        # Fresh image noise straight from the Gram's factorisation: one mv + one rmv per step
        # instead of two of each (the image part is independent of the kernel part either way;
        # needs the exact rank, as the probes of the rank estimators come from projected noise).
        if (self.image_noise == "fresh" and proj.samples_image_directly
                and not proj.differentiable and q.kernel_dim_source == "exact"):
            # (η is not used again: scale it in place)
            e = eta if restart else torch.add(eta.mul_(math.sqrt(1 - g)), k_prev,
                                               alpha=math.sqrt(g))
            k, img = proj.kernel_and_image(e)
        elif restart:
            e = eta
            k, img = q.split_noise(eta)
        else:
            e = math.sqrt(g) * k_prev + math.sqrt(1 - g) * eta
            if self.image_noise == "carried":
                w = math.sqrt(1 - g)
                k, img = q.split_noise(e, probe=eta if g < 1 else None,
                                       probe_weight=w if g < 1 else 1.0)
            else:
                both = proj(torch.cat([e, eta]))
                k, p_eta = both[:n], both[n:]
                img = eta - p_eta
                q.record_probes(eta, p_eta)
        self._note_refinement(proj)
        chain.append(k.detach())
        self._last_draw[n] = (e.detach(), k.detach())
        return k, img

    def _prediction_noise(self, n: int) -> Tuple[Tensor, Tensor]:
        if self._pred_noise is None:
            if not self._last_draw:
                raise RuntimeError(
                    "AutoViking has no kernel samples of the training data: call "
                    "guide.project_training_data(...) (or train it) before predicting.")
            if not self._warned_no_cache:
                warnings.warn("AutoViking predicts with the kernel samples of the last training "
                              "batch; call guide.project_training_data(...) for samples "
                              "projected on the whole training set.", stacklevel=3)
                self._warned_no_cache = True
            e, k = max(self._last_draw.items())[1]
        else:
            e, k = self._pred_noise, self._pred_kernel
        S = e.shape[0]
        idx = (torch.arange(n, device=e.device) + self._pred_counter) % S
        self._pred_counter = (self._pred_counter + n) % S
        if n > S:
            warnings.warn(f"{n} samples requested but only {S} projected samples are cached; "
                          f"they repeat. Call project_training_data(num_samples={n}).",
                          stacklevel=3)
        k = k[idx].to(self.loc.dtype)
        return k, e[idx].to(self.loc.dtype) - k

    # -- full passes over the training data -----------------------------------------------------
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
        frames = getattr(self, "_data_frames", {})
        if not frames:
            yield args, kwargs, {}
            return
        if len(frames) > 1:
            raise ValueError(f"the model subsamples several data plates {sorted(frames)}; pass "
                             "batches=[...] explicitly")
        ((name, frame),) = frames.items()
        # The model's plate fixes the batch size; the last chunk wraps around to the start
        # (repeated data only repeat rows of J, which leaves the kernel unchanged).
        size, full = frame.size, frame.full_size
        for start in range(0, full, size):
            idx = torch.arange(start, start + size, device=self.loc.device) % full
            yield args, kwargs, {name: idx}

    def project_training_data(
        self,
        *args,
        batches: Optional[Iterable] = None,
        num_samples: int = 100,
        num_passes: int = 1,
        progress: bool = False,
        refresh_training_state: bool = False,
        **kwargs,
    ) -> Tensor:
        """Project fresh samples onto the kernel of the *whole* training set's Jacobian.

        Alternating projections: ``k ← P_b k`` for every batch b, ``num_passes`` times (von
        Neumann: converges to the projection onto the intersection of the batch kernels, i.e.
        the kernel of the full-data Jacobian). The samples ``(ε, k)`` are cached and used by
        every later prediction (``Predictive``, ``guide()`` under ``poutine.mask(False)``).

        :param args, kwargs: the model's training arguments. If the model subsamples its data
            plate (``pyro.plate(name, N, subsample_size=B)``), the pass walks that plate in
            order in chunks of B (the last chunk wraps around to the start).
        :param batches: alternatively, an iterable of argument tuples (or ``(args, kwargs)``
            pairs, or kwargs dicts), e.g. a ``DataLoader`` yielding ``(x, y)``.
        :param num_samples: S, the number of cached samples.
        :param progress: show a progress bar.
        :param refresh_training_state: also restart the training chains from these samples
            (e.g. at the start of an epoch).
        :returns: the kernel samples ``(S, D)``.
        """
        if self.prototype_trace is None:
            if batches is not None:
                raise RuntimeError("call the guide once (e.g. one SVI step) before "
                                   "project_training_data(batches=...)")
            self._setup_prototype(*args, **kwargs)
        loc = self.loc.detach()
        e = torch.randn(num_samples, self.latent_dim, dtype=loc.dtype, device=loc.device)
        k = e.clone()
        work = [b for _ in range(num_passes) for b in self._iter_batches(args, kwargs, batches)]
        if progress:
            from tqdm.auto import tqdm

            work = tqdm(work, desc="projecting on training data", unit="batch")
        for a, kw, sub in work:
            proj = self._projector(loc, a, kw, sub, differentiable=False)
            with torch.no_grad():
                k = proj(k)
        self._pred_noise, self._pred_kernel, self._pred_counter = e, k, 0
        if refresh_training_state:
            self._carry = {num_samples: deque([k.clone()])}
        return k

    @property
    def projected_samples(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(ε, Pε)`` of the last :meth:`project_training_data`: the cached noise ``(S, D)``
        and its kernel part on the training data (``None`` before). A posterior sample is
        ``loc + σ_ker Pε + σ_im (ε − Pε)``; its kernel-only / image-only parts drop one term."""
        if self._pred_noise is None:
            return None
        return self._pred_noise, self._pred_kernel

    # -- Pyro's Gaussian-guide interface -----------------------------------------------------------
    @torch.no_grad()
    def median(self, *args, **kwargs) -> Dict[str, Tensor]:
        """Posterior median (= mean ``θ̂``) of each latent, in constrained space."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {site["name"]: biject_to(site["fn"].support)(value)
                for site, value in self._unpack_latent(self.loc.detach())}

    def _loc_scale(self, *args, **kwargs):
        """``(loc, marginal std)``: ``std² = σ_im² + (σ_ker² − σ_im²) diag P`` with ``diag P`` of
        the given call's data (exact), or estimated from the cached training-data samples."""
        sk, si = self.kernel_scale, self.image_scale.detach()
        if args or kwargs:
            if getattr(self, "_data_frames", None):
                raise ValueError(
                    f"the model subsamples its data plate(s) {sorted(self._data_frames)}, so one "
                    "call's data are a random minibatch; call guide.project_training_data(...) "
                    "and then guide.quantiles(q) without model arguments")
            proj = self._projector(self.loc.detach(), args, kwargs, None, differentiable=False)
            dP = proj.diag()
        elif self._pred_noise is not None:
            dP = (self._pred_noise * self._pred_kernel).mean(0).clamp(0.0, 1.0)
        else:
            raise RuntimeError("AutoViking's marginal scales need the training data: pass the "
                               "model's arguments, or call guide.project_training_data first")
        return self.loc.detach(), (si ** 2 + (sk ** 2 - si ** 2) * dP).sqrt()

    def __getstate__(self):
        # Pyro's AutoGuide.__getstate__ clears the model on the live object; copy instead.
        # PyroModule.__getstate__'s job is still needed: drop the weakrefs that constrained
        # parameter values (here the identity-constrained loc itself) keep to their parameter.
        for param in self.parameters(recurse=True):
            param.__dict__.pop("unconstrained", None)
        state = self.__dict__.copy()
        state["_model"] = None
        state["_raw_model"] = None
        state["master"] = None
        state["last_projector"] = None
        return state

    def set_model(self, model: Callable) -> None:
        """Re-attach the model after unpickling (only training and new projections need it)."""
        self._raw_model = (model,)
        self._model = (model,)
