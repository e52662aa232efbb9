"""The VIKING Gaussian ``N(loc, σ_ker² P + σ_im² (I − P))`` as a Pyro distribution."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from pyro_viking.linalg.projectors import KernelProjector

__all__ = ["KernelImageNormal", "KernelImageNormalBase", "RANK_ESTIMATORS",
           "marginal_variance"]

#: ``"exact"`` (rank of J from a factorised Gram), ``"hutchinson"`` (``⟨ε, Pε⟩`` estimates
#: ``R = tr P``, variance ``2R``), ``"image"`` (``⟨ε, ε − Pε⟩`` estimates ``D − R``, variance
#: ``2(D − R)``), ``"auto"`` (exact when available, else image).
RANK_ESTIMATORS = ("auto", "exact", "hutchinson", "image")


def marginal_variance(kernel_scale: Tensor, image_scale: Tensor, kernel_diag: Tensor) -> Tensor:
    """``diag Σ = σ_im² + (σ_ker² − σ_im²) diag(P)``: scales of batch shape, ``kernel_diag``
    ``(..., D)``; returns ``(..., D)``."""
    si2 = image_scale[..., None] ** 2
    return si2 + (kernel_scale[..., None] ** 2 - si2) * kernel_diag


class KernelImageNormalBase(TorchDistribution):
    r"""What a Gaussian ``N(loc, σ_ker² P + σ_im² (I − P))`` on ``R^D`` computes from its
    scales and ``R = tr P`` alone, whatever gives ``P`` (a projector, or samples already
    projected): mean, mode, ``log det Σ``, entropy, and the log-density from a Mahalanobis term.

    Subclasses set ``loc`` ``(..., D)``, ``kernel_scale`` and ``image_scale`` (broadcastable to
    the batch shape) and define :attr:`kernel_dim`.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "kernel_scale": constraints.positive,
        "image_scale": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = True

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def kernel_dim(self) -> Tensor:
        """``R = tr P`` (exact or estimated, as the subclass says)."""
        raise NotImplementedError

    def log_det_covariance(self) -> Tensor:
        """``log det Σ = 2R log σ_ker + 2(D − R) log σ_im`` (batch shape)."""
        D = self.event_shape[0]
        R = self.kernel_dim
        return 2 * R * self.kernel_scale.log() + 2 * (D - R) * self.image_scale.log()

    def entropy(self) -> Tensor:
        """``½ D (1 + log 2π) + R log σ_ker + (D − R) log σ_im`` (batch shape)."""
        D = self.event_shape[0]
        h = 0.5 * D * (1 + math.log(2 * math.pi)) + 0.5 * self.log_det_covariance()
        return h.expand(self.batch_shape)

    def _log_density(self, maha: Tensor) -> Tensor:
        """``−½ (maha + log det Σ + D log 2π)``: the log-density at ``x`` given its Mahalanobis
        term ``maha = (x − loc)ᵀ Σ⁻¹ (x − loc)``."""
        D = self.event_shape[0]
        return -0.5 * (maha + self.log_det_covariance() + D * math.log(2 * math.pi))

    def _log_density_of_noise(self, kernel_noise: Tensor, image_noise: Tensor) -> Tensor:
        """The log-density at ``loc + σ_ker k + σ_im i`` for the noise parts ``k = Pε`` and
        ``i = ε − Pε`` ``(..., D)``: its Mahalanobis term is ``‖k‖² + ‖i‖²`` (no projection)."""
        return self._log_density((kernel_noise ** 2).sum(-1) + (image_noise ** 2).sum(-1))


def _check_arguments(loc: Tensor, kernel_scale: Tensor, image_scale: Tensor) -> None:
    """``ValueError`` unless both scales are positive and ``loc`` is finite."""
    for name, s in (("kernel_scale", kernel_scale), ("image_scale", image_scale)):
        if not torch._C._get_tracing_state() and not bool((s > 0).all()):
            raise ValueError(f"{name} must be positive (σ > 0), got {s.detach().cpu()}")
    # one reduction instead of an elementwise pass (the exact test only when it fails)
    if not bool(torch.isfinite(loc.detach().sum())) \
            and not bool(torch.isfinite(loc.detach()).all()):
        raise ValueError(f"loc must be finite; got non-finite values in loc of shape "
                         f"{tuple(loc.shape)}")


class KernelImageNormal(KernelImageNormalBase):
    r"""Gaussian on ``R^D`` with covariance ``Σ = σ_ker² P + σ_im² (I − P)``.

    ``P`` is the orthogonal projector onto the kernel of a Jacobian, given as a
    :class:`~pyro_viking.linalg.KernelProjector`. A sample is
    ``x = loc + σ_ker Pε + σ_im (ε − Pε)``, ``ε ~ N(0, I_D)``.

    Quantities that need ``R = dim ker J = tr P`` use the exact rank when the projector has
    factorised the Gram matrix, or an unbiased estimate from the probes of the last draw
    (see :data:`RANK_ESTIMATORS`); :attr:`kernel_dim_source` says which was used. Estimates are
    constants for autograd (the paper stops their gradient).

    :param loc: ``(..., D)``.
    :param kernel_scale: ``σ_ker > 0``, broadcastable to the batch shape ``loc.shape[:-1]``.
    :param image_scale: ``σ_im > 0``, likewise.
    :param projector: projector onto ``ker J`` acting on ``(K, D)`` batches.
    :param rank_estimator: one of :data:`RANK_ESTIMATORS`.
    """

    def __init__(
        self,
        loc: Tensor,
        kernel_scale,
        image_scale,
        projector: KernelProjector,
        *,
        rank_estimator: str = "auto",
        validate_args: Optional[bool] = None,
    ):
        if not isinstance(loc, Tensor) or loc.dim() < 1:
            raise ValueError(f"loc must be a tensor of shape (..., D), got {loc!r}")
        D = loc.shape[-1]
        if not isinstance(projector, KernelProjector):
            raise ValueError(f"projector must be a KernelProjector, got {type(projector).__name__}")
        if projector.dim != D:
            raise ValueError(f"projector acts on vectors of dimension {projector.dim} but loc has "
                             f"shape {tuple(loc.shape)}; expected loc of shape (..., "
                             f"{projector.dim})")
        if rank_estimator not in RANK_ESTIMATORS:
            raise ValueError(f"rank_estimator must be one of {RANK_ESTIMATORS}, "
                             f"got {rank_estimator!r}")
        kernel_scale = torch.as_tensor(kernel_scale, dtype=loc.dtype, device=loc.device)
        image_scale = torch.as_tensor(image_scale, dtype=loc.dtype, device=loc.device)
        if validate_args is not False:  # (False: the caller has checked, e.g. AutoViking)
            _check_arguments(loc, kernel_scale, image_scale)
        try:  # (scalar scales, every training step: torch.broadcast_shapes is slow Python)
            batch_shape = loc.shape[:-1] if kernel_scale.dim() == image_scale.dim() == 0 \
                else torch.broadcast_shapes(loc.shape[:-1], kernel_scale.shape, image_scale.shape)
        except RuntimeError as e:
            raise ValueError(f"loc {tuple(loc.shape)}, kernel_scale {tuple(kernel_scale.shape)} "
                             f"and image_scale {tuple(image_scale.shape)} do not broadcast; "
                             "scales must broadcast to loc.shape[:-1]") from e
        self.loc = loc.expand(batch_shape + (D,))
        self.kernel_scale = kernel_scale.expand(batch_shape)
        self.image_scale = image_scale.expand(batch_shape)
        self.projector = projector
        self.rank_estimator = rank_estimator
        # Probe statistics from the last draw: per-coordinate estimates of diag(P), shared by
        # expanded copies (they are one distribution in Pyro's eyes).
        self._stats = {"diag_hutchinson": None, "diag_image": None, "num_probes": 0}
        super().__init__(batch_shape, torch.Size([D]), validate_args=validate_args)

    # -- structure ------------------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(KernelImageNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        D = self.event_shape[0]
        new.loc = self.loc.expand(batch_shape + (D,))
        new.kernel_scale = self.kernel_scale.expand(batch_shape)
        new.image_scale = self.image_scale.expand(batch_shape)
        new.projector = self.projector
        new.rank_estimator = self.rank_estimator
        new._stats = self._stats
        super(KernelImageNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def variance(self) -> Tensor:
        """Exact ``diag Σ = σ_im² + (σ_ker² − σ_im²) diag(P)`` (``diag P`` from the projector)."""
        return marginal_variance(self.kernel_scale, self.image_scale,
                                 self.projector.diag().to(self.loc.dtype))

    # -- sampling -------------------------------------------------------------------------------
    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.transform_noise(eps)

    def transform_noise(self, eps: Tensor, probe: Optional[Tensor] = None,
                        probe_weight: float = 1.0) -> Tensor:
        """``loc + σ_ker Pε + σ_im (ε − Pε)`` for noise ``ε`` of shape ``(..., D)``.

        Records the rank-estimator statistics ``⟨probe, Pε⟩ / w`` and ``⟨probe, ε − Pε⟩ / w``
        per coordinate. They are unbiased for ``diag P`` / ``diag(I − P)`` whenever
        ``E[probe εᵀ] = w I`` (default: ``probe = ε``, ``w = 1``, valid for ``ε ~ N(0, I)``).
        """
        k, img = self.split_noise(eps, probe=probe, probe_weight=probe_weight)
        return self.compose(k, img)

    def split_noise(self, eps: Tensor, probe: Optional[Tensor] = None,
                    probe_weight: float = 1.0) -> Tuple[Tensor, Tensor]:
        """``(Pε, ε − Pε)`` for ``ε`` of shape ``(..., D)``, recording probe statistics."""
        D = self.event_shape[0]
        flat = eps.reshape(-1, D)
        k = self.projector(flat)
        img = flat - k
        self.record_probes(flat if probe is None else probe.reshape(-1, D), k, probe_weight,
                           projected=flat)
        return k.reshape(eps.shape), img.reshape(eps.shape)

    @torch.no_grad()
    def record_probes(self, probe: Tensor, kernel_part: Tensor, probe_weight: float = 1.0,
                      projected: Optional[Tensor] = None) -> None:
        """Record the rank-estimator statistics of ``kernel_part = P·projected`` (default
        ``projected = probe``): per-coordinate means of ``probe ⊙ Pε / w`` and
        ``probe ⊙ (ε − Pε) / w``; all ``(K, D)``."""
        projected = probe if projected is None else projected
        k = kernel_part.detach()
        self._stats["diag_hutchinson"] = (probe * k).mean(0) / probe_weight
        self._stats["diag_image"] = (probe * (projected.detach() - k)).mean(0) / probe_weight
        self._stats["num_probes"] = probe.shape[0]

    def compose(self, kernel_part: Tensor, image_part: Tensor) -> Tensor:
        """``loc + σ_ker · kernel_part + σ_im · image_part``."""
        sk, si = self.kernel_scale, self.image_scale
        if sk.dim() == 0 and si.dim() == 0 and not kernel_part.requires_grad \
                and not image_part.requires_grad:
            return _ScaledSum.apply(self.loc, sk, si, kernel_part, image_part)
        out = torch.addcmul(self.loc, sk[..., None], kernel_part)
        return torch.addcmul(out, si[..., None], image_part)

    # -- kernel dimension -----------------------------------------------------------------------
    def _resolved_estimator(self) -> str:
        if self.rank_estimator == "auto":
            return "exact" if self.projector.solver != "cg" else "image"
        return self.rank_estimator

    def _ensure_probes(self) -> None:
        if self._stats["num_probes"] == 0:
            eps = torch.randn(1, self.event_shape[0], dtype=self.loc.dtype,
                              device=self.loc.device)
            with torch.no_grad():
                self.split_noise(eps)

    @property
    def kernel_dim_source(self) -> str:
        """Which estimate of ``R = dim ker`` the distribution uses."""
        return self._resolved_estimator()

    @property
    def kernel_dim(self) -> Tensor:
        """``R = tr P``: exact, or the unbiased estimate from the last draw.

        Estimates are not clipped to ``[0, D]``: clipping biases them (with ``R`` near ``D``,
        ``⟨ε, Pε⟩ ~ χ²_R`` often exceeds ``D``), and every use of ``R`` here is linear in it.
        """
        D = self.event_shape[0]
        est = self._resolved_estimator()
        if est == "exact":
            kd = self.projector.kernel_dim
            if kd is None:
                raise ValueError("rank_estimator='exact' needs a direct solver (eigh/cholesky) "
                                 "that factorises J Jᵀ; use 'image' or 'hutchinson' with CG")
            return torch.tensor(float(kd), dtype=self.loc.dtype, device=self.loc.device)
        self._ensure_probes()
        if est == "hutchinson":
            R = self._stats["diag_hutchinson"].sum()
        else:
            R = D - self._stats["diag_image"].sum()
        return R.to(self.loc.dtype)

    def kernel_diag(self) -> Tensor:
        """``diag P`` (shape ``(D,)``): exact, or the per-coordinate estimate of the last draw."""
        est = self._resolved_estimator()
        if est == "exact":
            return self.projector.diag().to(self.loc.dtype)
        self._ensure_probes()
        if est == "hutchinson":
            return self._stats["diag_hutchinson"].to(self.loc.dtype)
        return (1.0 - self._stats["diag_image"]).to(self.loc.dtype)

    # -- densities ------------------------------------------------------------------------------
    def log_prob(self, value: Tensor) -> Tensor:
        """``−½ (‖Pv‖²/σ_ker² + ‖v − Pv‖²/σ_im²) − ½ log det Σ − ½ D log 2π``, ``v = x − loc``."""
        if self._validate_args:
            self._validate_sample(value)
        D = self.event_shape[0]
        v = value - self.loc
        shape = v.shape
        k = self.projector(v.reshape(-1, D)).reshape(shape)
        img = v - k
        maha = ((k ** 2).sum(-1) / self.kernel_scale ** 2
                + (img ** 2).sum(-1) / self.image_scale ** 2)
        return self._log_density(maha)


class _ScaledSum(torch.autograd.Function):
    """``loc + a k + b i`` for scalars ``a, b`` and constant ``k, i`` (every training step).

    The backward reduces ``∂/∂a = ⟨ḡ, k⟩`` and ``∂/∂b = ⟨ḡ, i⟩`` by dot products instead of
    materialising ``ḡ ⊙ k`` and ``ḡ ⊙ i`` (two D-sized temporaries less per step)."""

    @staticmethod
    def forward(ctx, loc: Tensor, a: Tensor, b: Tensor, k: Tensor, i: Tensor) -> Tensor:
        ctx.save_for_backward(k, i)
        ctx.loc_shape = loc.shape
        return torch.addcmul(loc, a, k).addcmul_(b, i)

    @staticmethod
    def backward(ctx, grad: Tensor):
        k, i = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(-1)
        g_loc = grad.sum_to_size(ctx.loc_shape) if need[0] else None
        g_a = torch.dot(g, k.expand_as(grad).reshape(-1)) if need[1] else None
        g_b = torch.dot(g, i.expand_as(grad).reshape(-1)) if need[2] else None
        return g_loc, g_a, g_b, None, None
