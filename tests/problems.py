"""Test problems with known rank and spectrum, and dense reference implementations.

Shipped for the tests (pnkraemer/matfree ``test_util.py`` style): every structured object of the
package has a dense twin here, built with plain ``torch.linalg``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal


def _orthonormal(n: int, k: int, generator: Optional[torch.Generator]) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    return Q


def jacobian_with_rank(B: int, D: int, r: int, *, cond: float = 1.0, duplicates: int = 0,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """A ``(B, D)`` matrix of rank ``r`` with singular values log-spaced from 1 to ``1/cond``.

    The last ``duplicates`` rows are copies of earlier rows (dependent data, a singular Gram
    matrix), so ``r ≤ min(B − duplicates, D)`` is required.
    """
    distinct = B - duplicates
    if not (0 <= r <= min(distinct, D)) or duplicates < 0:
        raise ValueError(f"need 0 ≤ r ≤ min(B − duplicates, D), got B={B} D={D} r={r} "
                         f"duplicates={duplicates}")
    s = torch.logspace(0.0, -math.log10(cond), r) if r else torch.zeros(0)
    J = (_orthonormal(distinct, r, generator) * s) @ _orthonormal(D, r, generator).T
    if duplicates:
        idx = torch.randint(0, distinct, (duplicates,), generator=generator)
        J = torch.cat([J, J[idx]])
    return J


def spd_matrix(n: int, *, cond: float = 10.0, rank: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Symmetric PSD ``(n, n)`` matrix, eigenvalues log-spaced in ``[1/cond, 1]`` (``rank`` of
    them non-zero, default all)."""
    rank = n if rank is None else rank
    Q = _orthonormal(n, rank, generator)
    lam = torch.logspace(0.0, -math.log10(cond), rank)
    G = (Q * lam) @ Q.T
    return 0.5 * (G + G.T)


def dense_projector(J: Tensor) -> Tensor:
    """``I − J⁺ J``, the orthogonal projector onto ``ker J`` (differentiable at full rank)."""
    D = J.shape[-1]
    return torch.eye(D, dtype=J.dtype) - torch.linalg.pinv(J) @ J


def dense_covariance(P: Tensor, kernel_scale, image_scale) -> Tensor:
    """``σ_k² P + σ_i² (I − P)`` (broadcast over the scales' batch shape)."""
    sk2 = torch.as_tensor(kernel_scale)[..., None, None] ** 2
    si2 = torch.as_tensor(image_scale)[..., None, None] ** 2
    eye = torch.eye(P.shape[-1], dtype=P.dtype)
    cov = sk2 * P + si2 * (eye - P)
    return 0.5 * (cov + cov.transpose(-1, -2))


def dense_twin(loc: Tensor, kernel_scale, image_scale, J: Tensor) -> MultivariateNormal:
    """``MultivariateNormal(loc, σ_k² P + σ_i² (I − P))`` with P from :func:`dense_projector`."""
    cov = dense_covariance(dense_projector(J), kernel_scale, image_scale)
    return MultivariateNormal(loc, covariance_matrix=cov)


def block_scale(D: int, values) -> Tensor:
    """A ``(D,)`` scale vector constant on ``len(values)`` contiguous blocks of near-equal size."""
    values = torch.as_tensor(values, dtype=torch.get_default_dtype())
    sizes = [len(c) for c in torch.arange(D).tensor_split(len(values))]
    return torch.repeat_interleave(values, torch.tensor(sizes))


def linear_model_jacobian(N: int, D: int, *, noise: float = 1.0,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """Loss Jacobian of Gaussian linear regression at a random θ: rows ``(y_i − x_iᵀθ) x_i/σ²``.

    ``N < D`` random design rows: an over-parameterised model with ``rank J = N`` (a.s.).
    """
    X = torch.randn(N, D, generator=generator)
    theta = torch.randn(D, generator=generator)
    y = X @ theta + torch.randn(N, generator=generator)
    return ((y - X @ (0.5 * theta)) / noise**2)[:, None] * X
