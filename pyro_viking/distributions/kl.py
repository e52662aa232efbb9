r"""Closed-form KL between :class:`KernelImageNormal` and diagonal Gaussian priors.

For ``q = N(m, Σ)``, ``Σ = σ_k² P + σ_i² (I − P)``, ``R = tr P``, and a prior
``p = N(μ, S)``, ``S = diag(s²)``:

    KL(q‖p) = ½ [ tr(S⁻¹Σ) + (μ − m)ᵀ S⁻¹ (μ − m) − D + log det S − log det Σ ],
    tr(S⁻¹Σ) = σ_i² Σ_j s_j⁻² + (σ_k² − σ_i²) Σ_j P_jj s_j⁻²,
    log det Σ = 2R log σ_k + 2(D − R) log σ_i.

For an isotropic prior ``Σ_j P_jj s_j⁻² = R / s²`` needs only the kernel dimension; otherwise
``diag P`` is used (exact, or its unbiased per-coordinate probe estimate — see
:meth:`KernelImageNormal.kernel_diag`). With ``σ_k² = s²`` and ``μ = 0`` this reduces to the
paper's ``½[(D − R)(σ_i²/s² − 1 − log(σ_i²/s²)) + ‖m‖²/s²]``.

Registered for priors of type ``Independent(Normal, 1)`` over the flat vector (including
Pyro's ``Normal(μ, s).expand([D]).to_event(1)``) and ``Normal`` whose last batch dimension is
D (or broadcasts to it). Other priors raise ``NotImplementedError`` so that Pyro falls back to a
Monte Carlo estimate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, register_kl

from pyro_viking.distributions.kernel_image_normal import KernelImageNormal, marginal_variance

__all__ = ["cross_entropy_diag_normal", "kl_kernel_image_normal_diag",
           "kl_kernel_image_normal_isotropic"]


def _is_constant_last(s: Tensor) -> bool:
    if s.shape[-1] == 1 or s.stride(-1) == 0:
        return True
    return bool((s == s[..., :1]).all())


def kl_kernel_image_normal_diag(q: KernelImageNormal, prior_loc: Tensor,
                                prior_scale: Tensor) -> Tensor:
    """``KL(q ‖ N(prior_loc, diag(prior_scale²)))``; ``prior_*`` broadcast to ``(..., D)``.

    Returns a tensor of the broadcast batch shape.
    """
    D = q.event_shape[0]
    try:
        shape = torch.broadcast_shapes(q.loc.shape, prior_loc.shape, prior_scale.shape)
    except RuntimeError as e:  # not this rule's prior: let Pyro fall back to Monte Carlo
        raise NotImplementedError(f"prior of shape {tuple(prior_loc.shape)} does not broadcast "
                                  f"to q of shape {tuple(q.loc.shape)}") from e
    if shape[-1] != D:
        raise NotImplementedError(f"prior of event size {shape[-1]} vs q of size {D}")
    s = prior_scale.expand(shape)
    sk2 = q.kernel_scale[..., None] ** 2
    si2 = q.image_scale[..., None] ** 2
    inv_var = s.pow(-2)
    R = q.kernel_dim
    if _is_constant_last(prior_scale.expand(shape)):
        weighted_kernel = R * inv_var[..., 0]
    else:
        weighted_kernel = (q.kernel_diag() * inv_var).sum(-1)
    trace = (si2 * inv_var).sum(-1) + (sk2 - si2)[..., 0] * weighted_kernel
    maha = ((prior_loc - q.loc) ** 2 * inv_var).sum(-1)
    log_det_prior = 2 * s.log().sum(-1)
    return 0.5 * (trace + maha - D + log_det_prior - q.log_det_covariance())


def kl_kernel_image_normal_isotropic(q: KernelImageNormal, maha: Tensor,
                                     prior_scale: Tensor) -> Tensor:
    """``KL(q ‖ N(μ, s² I))`` for a scalar ``s``, given ``maha = ‖loc − μ‖²`` (batch shape):

    ``½ [ (D σ_im² + R (σ_ker² − σ_im²) + maha) / s² − D + 2D log s − log det Σ ]``.
    """
    D = q.event_shape[0]
    R = q.kernel_dim
    sk2, si2, s2 = q.kernel_scale ** 2, q.image_scale ** 2, prior_scale ** 2
    trace = (D * si2 + R * (sk2 - si2) + maha) / s2
    return 0.5 * (trace - D + 2 * D * prior_scale.log() - q.log_det_covariance())


@register_kl(KernelImageNormal, Independent)
def _kl_kin_independent(q: KernelImageNormal, p: Independent) -> Tensor:
    base = p.base_dist
    while isinstance(base, Independent):  # nested to_event: flatten only if total event is 1-D
        base = base.base_dist
    if not isinstance(base, Normal) or p.event_shape != q.event_shape:
        raise NotImplementedError
    return kl_kernel_image_normal_diag(q, base.loc, base.scale)


@register_kl(KernelImageNormal, Normal)
def _kl_kin_normal(q: KernelImageNormal, p: Normal) -> Tensor:
    return kl_kernel_image_normal_diag(q, p.loc, p.scale)


def cross_entropy_diag_normal(q: KernelImageNormal, prior_loc: Tensor, prior_scale: Tensor,
                              mask: Tensor) -> Tensor:
    """``−E_q[log N(z_M | μ_M, diag s_M²)]`` over the coordinates ``M`` where ``mask`` is True.

    ``= ½ Σ_{j∈M} [(Σ_jj + (m_j − μ_j)²) / s_j² + log(2π s_j²)]`` with
    ``Σ_jj = σ_i² + (σ_k² − σ_i²) P_jj`` (``diag P`` exact or estimated, as for the KL).
    Used when only some latents have Gaussian priors (the rest need a Monte Carlo term).
    """
    var = marginal_variance(q.kernel_scale, q.image_scale, q.kernel_diag())
    terms = (var + (q.loc - prior_loc) ** 2) / prior_scale ** 2 \
        + torch.log(2 * math.pi * prior_scale ** 2)
    return 0.5 * (terms * mask).sum(-1)


class _SquaredNorm(torch.autograd.Function):
    """``‖x‖²`` over the last dim, with a one-pass backward ``2 ḡ x`` (``(x ** 2).sum(-1)``
    takes three passes over D in its backward; the KL's ``‖θ̂‖²`` runs on every training step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.linalg.vecdot(x, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return x * (2 * grad)[..., None]


def squared_norm(x: Tensor) -> Tensor:
    """``‖x‖²`` over the last dimension ``(..., D) -> (...)`` (the Mahalanobis term of an
    isotropic zero-mean prior), differentiable with a one-pass backward."""
    return _SquaredNorm.apply(x)
