"""``AutoViking``: ``q(z) = N(θ̂, σ_ker² P + σ_im² (I − P))`` over all continuous latents
(flattened as in ``AutoContinuous``), ``P`` the projector onto the kernel of the Jacobian of the
per-datum log-likelihoods of the call's data at θ̂. Prediction (``get_mask() is False``, as
under ``Predictive``) draws from samples projected on the *training* data, never on its inputs."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import pyro
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam, pyro_method
from torch import Tensor
from torch.distributions import constraints

from pyro_viking.distributions import RANK_ESTIMATORS, KernelImageNormal
from pyro_viking.infer.autoguide.guide_checks import (
    check_finite_init,
    check_parameters,
    check_stored_loc,
)
from pyro_viking.infer.autoguide.kernel_scale import (
    TiedPriorScale,
    check_scale_arguments,
    resolve_kernel_scale,
)
from pyro_viking.infer.autoguide.model_params import params_to_save, restore_once
from pyro_viking.infer.autoguide.posteriors import PredictionPosterior, VikingPosterior
from pyro_viking.infer.autoguide.projector_choice import ProjectorBuilder
from pyro_viking.infer.autoguide.sampling import SamplingState
from pyro_viking.infer.autoguide.training_projection import (
    call_projector,
    plate_indices,
    project_on_training_data,
    refresh_prediction_samples,
)
from pyro_viking.model_trace import inspection
from pyro_viking.model_trace.layout import LatentLayout

__all__ = ["AutoViking"]


class AutoViking(AutoContinuous):
    """VIKING guide over all continuous latents of ``model``.

    :param init_loc_fn, init_image_scale: initial θ̂ (per site) and ``σ_im``.
    :param kernel_scale: ``"prior"`` ties ``σ_ker`` to the latents' common ``Normal`` prior scale
        (a ``pyro.param`` is followed, with gradients), ``"learned"`` makes it a parameter (from
        ``init_kernel_scale``, default the prior scales' RMS), ``"auto"`` ties when possible.
    :param gamma: memory ``γ ∈ [0, 1]`` of the stochastic alternating projections; ``jacobian,
        backend, solver, solver_options``: see ``projector_choice.ProjectorBuilder``.
    :param grad_through_projection: differentiate the samples through ``P(θ̂)`` (the paper's
        gradient; off by default, as the ablation in ``benchmarks/uq/README.md`` decided).
    :param rank_estimator: how ``dim ker`` enters the KL (``distributions.RANK_ESTIMATORS``);
        ``image_noise``: ``"fresh"`` (a fresh draw of ``N(0, I − P_t)``, as the KL assumes) or
        the paper's ``"carried"`` ``e − P_t e``; ``num_chains``: carried samples.
    """

    def __init__(self, model: Callable, *, init_loc_fn: Callable = init_to_median,
                 init_image_scale: float = 0.1, kernel_scale="auto",
                 init_kernel_scale: Optional[float] = None, gamma: float = 0.5,
                 jacobian: str = "loss", backend: str = "auto", solver: str = "auto",
                 solver_options: Optional[dict] = None, grad_through_projection: bool = False,
                 rank_estimator: str = "auto", image_noise: str = "fresh", num_chains: int = 1):
        check_scale_arguments(kernel_scale, init_image_scale, init_kernel_scale)
        if rank_estimator not in RANK_ESTIMATORS:
            raise ValueError(f"rank_estimator must be one of {RANK_ESTIMATORS}")
        self._builder = ProjectorBuilder(jacobian=jacobian, backend=backend, solver=solver,
                                         solver_options=solver_options)
        self._state = SamplingState(gamma, image_noise, int(num_chains))
        self._raw_model, self._inspector = (model,), None
        self.init_image_scale, self.init_kernel_scale = float(init_image_scale), init_kernel_scale
        self.kernel_scale_mode, self.gamma, self.jacobian = kernel_scale, float(gamma), jacobian
        self.grad_through_projection, self.rank_estimator = grad_through_projection, rank_estimator
        self.image_noise, self.last_projector = image_noise, None
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.layout = LatentLayout.from_trace(self.prototype_trace)
        inspection.check_no_subsampled_latents(self.prototype_trace, self.layout.names)
        self._inspector = inspection.ModelInspector(self._raw_model[0], self.layout)
        self._call = self._inspector(args, kwargs)
        init_loc = self._init_loc()
        check_finite_init(self.layout, init_loc)
        self.loc = PyroParam(init_loc)
        # reading self.loc gives the param store's value when it already holds this name
        check_stored_loc(self.loc, init_loc, f"{self._pyro_name}.loc", self.layout.names)
        self.image_scale = PyroParam(init_loc.new_tensor(self.init_image_scale),
                                     constraints.positive)
        #: ``"prior"`` (tied), ``"learned"`` or ``"fixed"``: how σ_ker is set, once set up
        self.kernel_scale_source, prior, value = resolve_kernel_scale(
            self.kernel_scale_mode, self.prototype_trace, self.layout.names, self.init_kernel_scale)
        if self.kernel_scale_source == "learned":
            self.kernel_scale_unconstrained = PyroParam(init_loc.new_tensor(value),
                                                        constraints.positive)
        else:  # tied to the prior scale, or fixed
            prior = init_loc.new_tensor(value) if prior is None else prior
            self._scale_source = TiedPriorScale(prior, self._raw_model[0], args, kwargs)

    def _create_plates(self, *args, **kwargs):
        if getattr(self, "_plates_ready", False):
            return self.plates  # already created by this call's forward
        plates = super()._create_plates(*args, **kwargs)
        # The data plates of this call, with their current sizes: their subsample indices fix
        # the minibatch of both the projection and the model. In an AutoGuideList ``plates``
        # is the list's own dict of this call, so the model replays the same indices.
        for name, frame in sorted(self._call.data_frames.items()):
            if name not in plates:
                plates[name] = pyro.plate(name, frame.full_size, dim=frame.dim,
                                          subsample_size=frame.size)
        return plates

    def forward(self, *args, **kwargs):
        inspection.check_not_jit_traced()
        restore_once(self)  # the model's params saved with the guide, where the store has none
        predicting = poutine.get_mask() is False
        if self.prototype_trace is None:
            if predicting:
                raise RuntimeError("AutoViking has not seen the training data: train it (SVI) "
                                   "or call guide(*training_args) before predicting")
            self._setup_prototype(*args, **kwargs)
        self._call = self._inspector(args, kwargs, training=not predicting)
        self._create_plates(*args, **kwargs)
        self._plates_ready = True  # plates first: their subsample indices serve the projection
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._plates_ready = False

    def _unpack_latent(self, latent: Tensor):
        for name, value in self.layout.batch_views(latent):  # one split, not a slice per site
            yield self.prototype_trace.nodes[name], value

    def _kernel_scale_now(self, args, kwargs, predicting: bool) -> Tensor:
        if self.kernel_scale_source == "learned":
            return self.kernel_scale_unconstrained
        return self._scale_source.value((self._raw_model or (None,))[0], args, kwargs,
                                        self.layout.names, predicting)

    @property
    def kernel_scale(self) -> Tensor:
        """``σ_ker`` (detached; a tied ``pyro.param`` prior scale at its current value)."""
        if self.prototype_trace is None:
            raise RuntimeError("AutoViking is not set up yet: train it or call guide(*args)")
        restore_once(self)
        return self._kernel_scale_now((), {}, predicting=True).detach()

    #: the Jacobian backend chosen at the first projection (``None`` before)
    backend_used = property(lambda self: self._builder.backend_used)
    #: ``(e, Pe)`` ``(n, D)`` of the last training draw (before / after projection)
    last_draw = property(lambda self: self._state.last)
    #: carried kernel samples per draw size (set by TraceViking_ELBO to its num_particles)
    num_chains = property(lambda self: self._state.num_chains,
                          lambda self, value: setattr(self._state, "num_chains", int(value)))

    def get_posterior(self, *args, **kwargs):
        if poutine.get_mask() is not False:
            return self.training_posterior(args, kwargs)
        loc, si, sk = self.loc, self.image_scale, self._kernel_scale_now(args, kwargs, True)
        check_parameters(loc, si, sk)
        refresh_prediction_samples(self, self._state.begin_prediction(args, kwargs))
        return PredictionPosterior(loc, sk, si, state=self._state, layout=self.layout)

    @pyro_method  # a public method reading Pyro-managed attributes (loc, image_scale)
    def training_posterior(self, args: tuple, kwargs: dict,
                           rows: Optional[Callable[[Tensor], Tensor]] = None) -> VikingPosterior:
        """``q`` of a training call (``rows``: ``z → (B,)`` likelihood rows instead of a trace)."""
        loc, si, sk = self.loc, self.image_scale, self._kernel_scale_now(args, kwargs, False)
        check_parameters(loc, si, sk)
        self._state.note_training_call(args, kwargs)
        self.last_projector = call_projector(
            self, args, kwargs, plate_indices(self.plates, self._call.data_frames),
            self.grad_through_projection, True
        ) if rows is None else self._builder.build_from_rows(rows, loc, training=True)
        return VikingPosterior(loc, sk, si, self.last_projector, state=self._state,
                               layout=self.layout, rank_estimator=self.rank_estimator,
                               validate_args=False)

    def project_training_data(self, *args, batches: Optional[Iterable] = None,
                              num_samples: int = 100, num_passes: int = 1, progress: bool = False,
                              refresh_training_state: bool = False, distributed: bool = False,
                              **kwargs) -> Tensor:
        """Project ``num_samples`` fresh samples onto the kernel of the *whole* training set's
        Jacobian by ``num_passes`` passes of alternating projections over its batches
        (``model_trace.inspection.training_batches``); cache ``(ε, k)`` for predictions;
        ``refresh_training_state`` restarts the training chains from them. Returns ``k (S, D)``.
        ``distributed``: the data are this rank's shard, ``training_projection.project_sharded``."""
        if self.prototype_trace is None:
            if batches is not None:
                raise RuntimeError("call the guide once before project_training_data(batches=)")
            self._setup_prototype(*args, **kwargs)
        k = project_on_training_data(self, args, kwargs, batches, num_samples, num_passes,
                                     progress, lazy=False, distributed=distributed)
        if refresh_training_state:
            self._state.restart_chains(k)
        return k

    @property
    def projected_samples(self):
        """``(ε, Pε)`` ``(S, D)`` on the training data (or None); see ``PredictionPosterior``."""
        return None if self._state.noise is None else (self._state.noise, self._state.kernel)

    def median(self, *args, **kwargs) -> Dict[str, Tensor]:
        """Posterior median (= mean θ̂) of each latent, in constrained space."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {k: v.clone() for k, v in self.layout.unpack(self.loc.detach()).items()}

    def _loc_scale(self, *args, **kwargs):
        """``(loc, √(σ_im² + (σ_ker² − σ_im²) diag P))``, ``diag P`` of the call, or estimated."""
        if self.prototype_trace is None:
            if not (args or kwargs):
                raise RuntimeError("AutoViking is not set up: train it (or pass the model's "
                                   "arguments) before asking for quantiles")
            self._setup_prototype(*args, **kwargs)
        loc, sk, si = self.loc.detach(), self.kernel_scale, self.image_scale.detach()
        if not (args or kwargs):
            refresh_prediction_samples(self, 0)
            q = PredictionPosterior(loc, sk, si, state=self._state, layout=self.layout)
        elif self._inspector(args, kwargs).data_frames:
            raise ValueError("the model subsamples its data plate, so one call's data are a "
                             "random minibatch; call guide.quantiles(q) without arguments")
        else:
            q = KernelImageNormal(loc, sk, si, call_projector(self, args, kwargs, None))
        return loc, q.variance.sqrt()

    def __getstate__(self):
        # Pyro's clears the model of the live guide: copy. Drop weakrefs, as PyroModule does.
        if self.prototype_trace is not None:  # save samples projected on the training data
            refresh_prediction_samples(self, 0)
        for param in self.parameters(recurse=True):
            param.__dict__.pop("unconstrained", None)
        return {**self.__dict__, "_model": None, "_raw_model": None, "master": None,
                "last_projector": None, "_saved_model_params": params_to_save(self)}

    def set_model(self, model: Callable) -> None:
        """Re-attach the model after loading (training and projections need it)."""
        self._raw_model = self._model = (model,)
        if self._inspector is not None:
            self._inspector.set_model(model)
