"""The two posteriors :class:`~pyro_viking.AutoViking` returns: :class:`VikingPosterior`
(training: carried kernel samples projected on the call's minibatch) and
:class:`PredictionPosterior` (prediction: samples projected on the training data). Both get the
:class:`~pyro_viking.infer.autoguide.sampling.SamplingState` when they are built and draw from
it; neither knows the guide."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pyro_viking.distributions import KernelImageNormal, KernelImageNormalBase, marginal_variance
from pyro_viking.infer.autoguide.sampling import SamplingState
from pyro_viking.model_trace.layout import LatentLayout

__all__ = ["PredictionPosterior", "VikingPosterior"]


class VikingPosterior(KernelImageNormal):
    """:class:`KernelImageNormal` whose draws follow the stochastic alternating projections of
    a :class:`SamplingState`; ``layout`` says which model latents its coordinates are."""

    def __init__(self, loc, kernel_scale, image_scale, projector, *, state: SamplingState,
                 layout: LatentLayout, rank_estimator: str = "auto",
                 validate_args: Optional[bool] = None):
        super().__init__(loc, kernel_scale, image_scale, projector,
                         rank_estimator=rank_estimator, validate_args=validate_args)
        self.state, self.layout = state, layout

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(VikingPosterior, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.state, new.layout = self.state, self.layout
        return new

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        k, img = self.state.training_draw(self, math.prod(shape[:-1]))
        k, img = k.reshape(shape), img.reshape(shape)
        value = self.compose(k, img)
        self.state.watch(value)  # its carry is kept once a backward pass reaches it
        self._draw_cache = (value, k, img)
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        """As :meth:`KernelImageNormal.log_prob`; for this distribution's own last draw the
        Mahalanobis term is ``‖k‖² + ‖i‖²`` (no second projection)."""
        cache = getattr(self, "_draw_cache", None)
        if cache is None or value is not cache[0]:
            return super().log_prob(value)
        _, k, img = cache
        return self._log_density_of_noise(k, img)


class PredictionPosterior(KernelImageNormalBase):
    r"""The posterior at prediction time: ``loc + σ_ker Pε + σ_im (ε − Pε)`` for the samples
    ``(ε, Pε)`` projected on the *training* data that ``state`` holds when it is built (the
    state only keeps the count of samples used).

    ``P`` itself is not available, so the moments use the Hutchinson estimate
    ``diag P ≈ mean_s ε_s ⊙ Pε_s`` over the samples (clipped to ``[0, 1]``); ``log_prob`` is
    available only for this distribution's own last draw.
    """

    def __init__(self, loc: Tensor, kernel_scale, image_scale, *, state: SamplingState,
                 layout: LatentLayout, validate_args: Optional[bool] = None):
        self.loc = loc
        self.kernel_scale = torch.as_tensor(kernel_scale, dtype=loc.dtype, device=loc.device)
        self.image_scale = torch.as_tensor(image_scale, dtype=loc.dtype, device=loc.device)
        self.state, self.layout = state, layout
        self.noise, self.kernel = (t.to(loc.dtype) for t in state.prediction_samples())
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PredictionPosterior, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.kernel_scale, new.image_scale = self.kernel_scale, self.image_scale
        new.state, new.layout, new.noise, new.kernel = (self.state, self.layout, self.noise,
                                                        self.kernel)
        super(PredictionPosterior, new).__init__(batch_shape, self.event_shape,
                                                 validate_args=False)
        return new

    def kernel_diag(self) -> Tensor:
        """Estimate of ``diag P`` ``(D,)`` from the training-data samples."""
        return (self.noise * self.kernel).mean(0).clamp(0.0, 1.0)

    @property
    def kernel_dim(self) -> Tensor:
        """Estimate of ``R = tr P``."""
        return self.kernel_diag().sum()

    @property
    def variance(self) -> Tensor:
        var = marginal_variance(self.kernel_scale, self.image_scale, self.kernel_diag())
        return var.expand(self.loc.shape)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        idx = self.state.next_indices(math.prod(shape[:-1]), self.noise.shape[0])
        # θ̂ + σ_ker k + σ_im (e − k) = θ̂ + σ_im e + (σ_ker − σ_im) k: two passes over (S, D)
        si, dk = self.image_scale[..., None], (self.kernel_scale - self.image_scale)[..., None]
        one_loc = all(st == 0 for st in self.loc.stride()[:-1])  # θ̂, or θ̂ expanded
        if not torch.is_grad_enabled() and one_loc and si.dim() == 1:
            value = self._draw_runs(idx, si, dk).reshape(shape)  # Predictive: no copies
        else:
            idx = idx.to(self.noise.device)
            e = self.noise.index_select(0, idx).reshape(shape)
            value = torch.addcmul(self.loc, e, si)
            value = value.addcmul_(self.kernel.index_select(0, idx).reshape(shape), dk)
        self._draw_cache = (value, idx, shape)
        return value

    def _draw_runs(self, idx: Tensor, si: Tensor, dk: Tensor) -> Tensor:
        """``θ̂ + σ_im e_j + (σ_ker − σ_im) k_j`` for ``j`` in ``idx`` (cycling through the
        cached samples), written run by run of consecutive ``j`` from views of the cache."""
        n, S = idx.shape[0], self.noise.shape[0]
        loc = self.loc[(0,) * (self.loc.dim() - 1)]  # (D,)
        out = loc.new_empty((n, loc.shape[-1]))
        i, start = 0, idx.tolist()
        while i < n:
            a = start[i]
            length = min(n - i, S - a)
            rows = out[i:i + length]
            torch.addcmul(loc, self.noise[a:a + length], si, out=rows)
            rows.addcmul_(self.kernel[a:a + length], dk)
            i += length
        return out

    def log_prob(self, value: Tensor) -> Tensor:
        cache = getattr(self, "_draw_cache", None)
        if cache is None or value is not cache[0]:
            raise NotImplementedError(
                "the prediction-time AutoViking posterior has no projector of its own (its "
                "samples come from the training data); evaluate densities in training mode")
        _, idx, shape = cache
        idx = idx.to(self.noise.device)
        k = self.kernel.index_select(0, idx).reshape(shape)
        img = self.noise.index_select(0, idx).reshape(shape) - k
        return self._log_density_of_noise(k, img)
