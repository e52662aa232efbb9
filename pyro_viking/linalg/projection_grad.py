r"""The implicit-differentiation backward of the kernel projection ``X = P(θ) E``.

``(x, λ)`` solve the KKT system ``[[I, Jᵀ], [J, 0]] [x; λ] = [e; 0]``. For an incoming
cotangent ``x̄`` the adjoint system (same matrix) gives ``ξ_x = P x̄`` and
``ξ_λ = (J Jᵀ)⁺ J x̄``; then ``∂/∂e = ξ_x`` and, for whatever J depends on,

    ∂/∂θ = −∇_θ [ λᵀ J(θ) ξ_x + ξ_λᵀ J(θ) x ],

the gradient of two bilinear forms of J, provided by the operator
(:meth:`~pyro_viking.linalg.operators.JacobianOperator.bilinear_grad`). The backward runs one
more projection, on a basis of the cotangent rows' span (:func:`_row_basis`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyro_viking.linalg.per_example import gram64

__all__ = ["ProjectFunction"]


class ProjectFunction(torch.autograd.Function):
    """``X = P(θ) E`` with the implicit-differentiation backward of the module docstring.

    ``apply(projector, pre, E, *params)``: ``projector`` a
    :class:`~pyro_viking.linalg.projectors.KernelProjector`, ``pre`` its ``(P E, Λ)`` when
    the caller has them already (else ``None``: solved here), ``E`` ``(K, D)``, ``params`` the
    operator's tensors that require grad."""

    @staticmethod
    def forward(ctx, projector, pre: Optional[Tuple[Tensor, Tensor]],
                E: Tensor, *params: Tensor) -> Tensor:
        # pre: (P E, Λ) already computed by the caller (kernel_and_image), else solved here
        if pre is None:
            X, Lam, projector.info = projector._project_nograd(E)
        else:
            X, Lam = pre
        ctx.projector = projector
        ctx.num_params = len(params)
        ctx.save_for_backward(X, Lam)
        return X

    @staticmethod
    def backward(ctx, Xbar: Tensor):
        # Detached: X is this node's own output, so the saved X carries this node as grad_fn and
        # differentiating the bilinear form through it would re-enter this backward forever.
        X, Lam = (t.detach() for t in ctx.saved_tensors)
        proj = ctx.projector
        # Everything below is linear in the cotangent rows, so it runs on a basis of their span:
        # Xbar = A Xb. (An AutoViking draw gives a particle's kernel and image rows the
        # proportional cotangents σ_ker ḡ and −σ_im ḡ: 2K rows, rank K.)
        A, Xb = _row_basis(Xbar)
        Xi_xb, Xi_lamb, _ = proj._project_nograd(Xb)
        Xi_x = None
        if ctx.needs_input_grad[2]:
            Xi_x = Xi_xb if A is None else A.to(Xi_xb.dtype) @ Xi_xb
        grads = [None] * ctx.num_params
        if ctx.num_params and any(ctx.needs_input_grad[3:]):
            if A is not None:  # Σ_k λ_k J (ξ_x)_kᵀ = Σ_j (Aᵀλ)_j J (ξ_xb)_jᵀ, likewise for X
                At = A.T.to(Lam.dtype)
                Lam, X = At @ Lam, At @ X
            got = proj.operator.bilinear_grad(torch.cat([Lam, Xi_lamb]), torch.cat([Xi_xb, X]))
            # None where J does not depend on a param (a model linear in θ, rows without θ)
            grads = [None if g is None else -g for g in got]
        return (None, None, Xi_x, *grads)


#: Columns per float64 chunk of the cotangents' Gram in :func:`_row_basis`.
_GRAM64_CHUNK = 2**16


def _row_basis(M: Tensor) -> Tuple[Optional[Tensor], Tensor]:
    """``(A, Mb)`` with ``M ≈ A Mb`` and ``Mb`` an orthogonal basis of the rows' span (``(r, D)``,
    directions with singular values below ``100 eps · σ_max`` dropped), or ``(None, M)`` when
    the rows are independent."""
    n = M.shape[0]
    if n == 1:
        return None, M
    evals, V = torch.linalg.eigh(gram64(M, _GRAM64_CHUNK))
    keep = evals > (100 * torch.finfo(M.dtype).eps) ** 2 * evals.max().clamp_min(0.0)
    r = int(keep.sum())
    if r == n:
        return None, M
    if r == 0:
        return torch.zeros(n, 1, dtype=M.dtype, device=M.device), M[:1] * 0
    V, s = V[:, keep], evals[keep].sqrt()
    return (V * s).to(M.dtype), ((V / s).T.to(M.dtype) @ M)
