"""Orthogonal projection onto the kernel of a Jacobian, with implicit differentiation.

For ``J ∈ R^{B×D}`` and vectors ``E`` (rows, ``(K, D)``) the kernel part is

    P E = E − Λ J,     Λ (J Jᵀ) = E Jᵀ     (Λ: ``(K, B)``, the minimum-norm solution),

i.e. ``P = I − Jᵀ (J Jᵀ)⁺ J``. The image part is ``E − P E``.

**Gradients.** ``(x, λ)`` solve the KKT system ``[[I, Jᵀ], [J, 0]] [x; λ] = [e; 0]``. For an
incoming cotangent ``x̄`` the adjoint system (same matrix) gives ``ξ_x = P x̄`` and
``ξ_λ = (J Jᵀ)⁺ J x̄``; then ``∂/∂e = ξ_x`` and, for whatever J depends on,
``∂/∂θ = −∇_θ [ λᵀ J(θ) ξ_x + ξ_λᵀ J(θ) x ]`` — two bilinear forms of J, provided by the
operator (:meth:`~pyro_viking.linalg.operators.JacobianOperator.bilinear`). With
``differentiable=False`` the projection is treated as a constant linear map of E (the gradient
w.r.t. θ through P is stopped; the gradient w.r.t. E is still ``P x̄``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .operators import CallableJacobian, DenseJacobian, JacobianOperator
from .solvers import (
    SolveInfo,
    cg_solve,
    cholesky_solve,
    default_rcond,
    eigh_factor,
    eigh_solve,
)

__all__ = ["KernelProjector", "DenseProjector", "MatrixFreeProjector"]

_SOLVERS = ("auto", "eigh", "cholesky", "cg")


class KernelProjector:
    """``E ↦ P E``, the orthogonal projection onto ``ker J``, for a batch ``E`` of shape ``(K, D)``.

    :param operator: the Jacobian.
    :param solver: ``"eigh"`` (pseudo-inverse of the float64 Gram; exact rank),
        ``"cholesky"`` (float64 Gram; falls back to eigh when singular), ``"cg"`` (matrix-free,
        ``mv ∘ rmv``), or ``"auto"``: eigh when the operator has a cheap Gram, else CG.
    :param rtol, atol, maxiter, reorthogonalize: CG settings (see :func:`cg_solve`).
    :param rcond: pseudo-inverse threshold of the direct solvers (see :func:`eigh_solve`).
    :param refine: iterative-refinement passes of the direct solvers (reuse the factorisation:
        each costs one ``mv`` and one ``rmv``); they remove the round-off of low-precision
        Jacobians.
    :param differentiable: differentiate through P w.r.t. ``operator.params`` (implicit).

    After each call, :attr:`info` holds the :class:`SolveInfo` of the forward solve.
    """

    def __init__(
        self,
        operator: JacobianOperator,
        *,
        solver: str = "auto",
        rtol: float = 1e-6,
        atol: float = 0.0,
        maxiter: Optional[int] = None,
        reorthogonalize: bool = True,
        rcond: Optional[float] = None,
        refine: int = 1,
        differentiable: bool = True,
    ):
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
        if solver == "auto":
            solver = "eigh" if operator.has_cheap_gram else "cg"
        self.operator = operator
        self.solver = solver
        self.cg_options = dict(rtol=rtol, atol=atol, maxiter=maxiter,
                               reorthogonalize=reorthogonalize)
        self.rcond = rcond
        self.refine = int(refine)
        self.differentiable = differentiable
        self.info: Optional[SolveInfo] = None
        self._gram: Optional[Tensor] = None
        self._eig: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    # -- shapes -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """D, the dimension of the vectors projected."""
        return self.operator.shape[1]

    @property
    def num_rows(self) -> int:
        """B, the number of rows of J."""
        return self.operator.shape[0]

    # -- solves -----------------------------------------------------------------------------
    def gram(self) -> Tensor:
        """The float64 Gram ``J Jᵀ`` (computed once)."""
        if self._gram is None:
            with torch.no_grad():
                G = self.operator.gram()
            if not torch.isfinite(G).all():
                raise ValueError("J contains non-finite values (its Gram matrix J Jᵀ is not "
                                 "finite); check the log-likelihood at the current parameters")
            self._gram = G
        return self._gram

    def solve(self, R: Tensor) -> Tuple[Tensor, SolveInfo]:
        """``Λ`` with ``Λ (J Jᵀ) = R`` (minimum norm), ``R`` of shape ``(K, B)``."""
        if self.solver == "cg":
            op = self.operator
            return cg_solve(lambda X: op.mv(op.rmv(X)), R, **self.cg_options)
        if self.solver == "eigh":
            return eigh_solve(self.gram(), R, factor=self._eigh())
        return cholesky_solve(self.gram(), R, rcond=self.rcond, jac_dtype=self.operator.dtype)

    def _eigh(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The eigendecomposition of the Gram, computed once per projector."""
        if self._eig is None:
            rcond = self.rcond
            if rcond is None:
                rcond = default_rcond(self.num_rows, self.operator.dtype)
            self._eig = eigh_factor(self.gram(), rcond)
        return self._eig

    def _project_nograd(self, E: Tensor) -> Tuple[Tensor, Tensor, SolveInfo]:
        with torch.no_grad():
            op = self.operator
            Lam, info = self.solve(op.mv(E))
            X = E - op.rmv(Lam)
            # Iterative refinement: J X is the float32 round-off of the first pass; one more
            # solve with the same factorisation removes most of it (LeNet: 2e-4 -> 1e-6).
            for _ in range(self.refine if self.solver != "cg" else 0):
                dLam, _ = self.solve(op.mv(X))
                X = X - op.rmv(dLam)
                Lam = Lam + dLam
            return X, Lam, info

    # -- public -----------------------------------------------------------------------------
    def __call__(self, E: Tensor) -> Tensor:
        """Kernel part ``P E`` of ``E`` (``(K, D)`` or ``(D,)``)."""
        if E.shape[-1] != self.dim:
            raise ValueError(f"vectors to project must have last dimension D={self.dim}, "
                             f"got shape {tuple(E.shape)}")
        squeeze = E.dim() == 1
        E2 = E.reshape(-1, self.dim)
        params = self.operator.params if self.differentiable else ()
        params = tuple(p for p in params if p.requires_grad)
        if torch.is_grad_enabled() and (E2.requires_grad or params):
            X = _ProjectFunction.apply(self, E2, *params)
        else:
            X, _, self.info = self._project_nograd(E2)
        return X[0] if squeeze else X.reshape(E.shape)

    def image(self, E: Tensor) -> Tensor:
        """Image part ``(I − P) E``."""
        return E - self(E)

    @property
    def rank(self) -> Optional[int]:
        """Numerical rank of J when a direct solver has factorised its Gram, else ``None``."""
        if self.solver == "cg":
            return None
        if self.info is None or self.info.rank is None:
            _, info = self.solve(torch.zeros(1, self.num_rows, dtype=self.operator.dtype,
                                             device=self.operator.device))
            self.info = info
        return self.info.rank

    @property
    def kernel_dim(self) -> Optional[int]:
        """``dim ker J = D − rank J`` when the rank is known exactly, else ``None``."""
        r = self.rank
        return None if r is None else self.dim - r

    def diag(self) -> Tensor:
        """Exact ``diag(P)`` (shape ``(D,)``), from ``diag(Jᵀ G⁺ J) = Σ_b (G^{+½} J)_{b,:}²``.

        Costs one batched ``rmv`` with B right-hand sides (or a dense Jacobian for CG).
        """
        with torch.no_grad():
            evals, U, keep = self._eigh()
            half = torch.where(keep, evals.clamp_min(0).rsqrt(), torch.zeros_like(evals))
            W = self.operator.rmv((U * half).T.to(self.operator.dtype))  # (B, D)
            return 1.0 - (W.to(torch.float64) ** 2).sum(0).to(self.operator.dtype)


class _ProjectFunction(torch.autograd.Function):
    """``X = P(θ) E`` with the implicit-differentiation backward of the module docstring."""

    @staticmethod
    def forward(ctx, projector: KernelProjector, E: Tensor, *params: Tensor) -> Tensor:
        X, Lam, info = projector._project_nograd(E)
        projector.info = info
        ctx.projector = projector
        ctx.num_params = len(params)
        ctx.save_for_backward(X, Lam)
        return X

    @staticmethod
    def backward(ctx, Xbar: Tensor):
        # Detached: X is this node's own output, so the saved X carries this node as grad_fn and
        # differentiating the bilinear form through it would re-enter this backward forever.
        X, Lam = (t.detach() for t in ctx.saved_tensors)
        proj: KernelProjector = ctx.projector
        Xi_x, Xi_lam, _ = proj._project_nograd(Xbar)
        grads = [None] * ctx.num_params
        if ctx.num_params and any(ctx.needs_input_grad[2:]):
            params = tuple(p for p in proj.operator.params if p.requires_grad)
            with torch.enable_grad():
                b = proj.operator.bilinear(torch.cat([Lam, Xi_lam]), torch.cat([Xi_x, X]))
                # b is constant when J does not depend on its params (a model linear in θ)
                if b.requires_grad:
                    grads = torch.autograd.grad(-b, params, allow_unused=True)
        return (None, Xi_x, *grads)


def DenseProjector(J: Tensor, **kwargs) -> KernelProjector:
    """Projector onto ``ker J`` for an explicit ``(B, D)`` matrix J (default solver eigh).

    Keyword arguments are those of :class:`KernelProjector`.
    """
    return KernelProjector(DenseJacobian(J), **kwargs)


def MatrixFreeProjector(mv, rmv, shape, *, dtype=None, device=None, params=(), bilinear=None,
                        **kwargs) -> KernelProjector:
    """Projector from ``mv(V) = V Jᵀ`` and ``rmv(U) = U J`` callables (default solver CG).

    ``params``/``bilinear`` are those of :class:`~pyro_viking.linalg.operators.CallableJacobian`;
    other keyword arguments are those of :class:`KernelProjector`.
    """
    op = CallableJacobian(mv, rmv, shape, dtype=dtype or torch.get_default_dtype(),
                          device=device, params=params, bilinear=bilinear)
    return KernelProjector(op, **kwargs)
