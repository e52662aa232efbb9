"""Orthogonal projection onto the kernel of a Jacobian, with implicit differentiation.

For ``J ∈ R^{B×D}`` and vectors ``E`` (rows, ``(K, D)``) the kernel part is

    P E = E − Λ J,     Λ (J Jᵀ) = E Jᵀ     (Λ: ``(K, B)``, the minimum-norm solution),

i.e. ``P = I − Jᵀ (J Jᵀ)⁺ J``. The image part is ``E − P E``.

**Gradients** (:mod:`~pyro_viking.linalg.projection_grad`): implicit differentiation of
the KKT system of the projection, w.r.t. E and whatever J depends on. With
``differentiable=False`` the projection is treated as a constant linear map of E (the gradient
w.r.t. θ through P is stopped; the gradient w.r.t. E is still ``P x̄``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyro_viking.linalg.operators import CallableJacobian, JacobianOperator
from pyro_viking.linalg.per_example import PerExampleJacobian
from pyro_viking.linalg.projection_grad import ProjectFunction
from pyro_viking.linalg.solvers import (
    SolveInfo,
    cg_solve,
    cholesky_factor,
    cholesky_solve,
    default_rcond,
    eigh_factor,
    eigh_solve,
)

__all__ = ["KernelProjector", "DenseProjector", "MatrixFreeProjector"]

#: the Gram solvers a :class:`KernelProjector` accepts
SOLVERS = ("auto", "eigh", "cholesky", "cg")


class KernelProjector:
    """``E ↦ P E``, the orthogonal projection onto ``ker J``, for a batch ``E`` of shape ``(K, D)``.

    :param operator: the Jacobian.
    :param solver: ``"eigh"`` (pseudo-inverse of the float64 Gram; exact rank),
        ``"cholesky"`` (float64 Gram, factorised once; falls back to eigh when numerically
        singular, see :func:`~pyro_viking.linalg.solvers.cholesky_factor`), ``"cg"``
        (matrix-free, ``mv ∘ rmv``), or ``"auto"``: when the operator has a cheap Gram,
        cholesky (cheaper than an eigendecomposition; ``benchmarks/bench_step.py``, section
        ``accuracy``, times both), or eigh if an explicit ``rcond`` is given (a pivot can hide
        a small eigenvalue); else CG.
    :param rtol, atol, maxiter, reorthogonalize: CG settings (see :func:`cg_solve`).
    :param rcond: pseudo-inverse threshold of the direct solvers (see :func:`eigh_solve`).
    :param refine: most iterative-refinement passes of the direct solvers (they reuse the
        factorisation and remove the round-off of low-precision Jacobians). A pass first
        measures the residual ``J X`` (one ``mv``) and stops there when
        ``‖J X‖ / ‖J E‖ ≤ refine_tol`` for every vector; otherwise it corrects X (one ``rmv``).
    :param refine_tol: residual below which refinement stops (default ``1e-6``: about 10
        float32 epsilons, below which a float32 Jacobian is itself no more accurate; the
        residuals of a first pass on the benchmark networks are measured by
        ``benchmarks/bench_step.py``, section ``accuracy``). ``0`` always refines.
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
        refine_tol: float = 1e-6,
        differentiable: bool = True,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "auto":
            # An explicit rcond asks for its pseudo-inverse semantics exactly: eigh.
            direct = "cholesky" if rcond is None else "eigh"
            solver = direct if operator.has_cheap_gram else "cg"
        self.operator = operator
        self.solver = solver
        self.cg_options = dict(rtol=rtol, atol=atol, maxiter=maxiter,
                               reorthogonalize=reorthogonalize)
        self.rcond = rcond
        self.refine = int(refine)
        self.refine_tol = float(refine_tol)
        if self.refine < 0 or not self.refine_tol >= 0:
            raise ValueError(f"refine must be >= 0 and refine_tol >= 0, got {refine} and "
                             f"{refine_tol}")
        self.differentiable = differentiable
        if not differentiable:
            operator.release_graph()  # (a layer-Gram build's graph, kept for the gradient)
        self.info: Optional[SolveInfo] = None
        self._gram: Optional[Tensor] = None
        self._eig: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._chol_cache: Optional[Tuple[Optional[Tensor]]] = None

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
        L = self._cholesky()
        if self.solver == "eigh" or L is None:
            Lam, info = eigh_solve(self.gram(), R, factor=self._eigh())
            if self.solver == "cholesky":
                info.method = "cholesky->eigh"
            return Lam, info
        return cholesky_solve(self.gram(), R, factor=L)

    def _cholesky(self) -> Optional[Tensor]:
        """The Cholesky factor of the Gram (solver ``"cholesky"``; ``None`` when singular or
        for other solvers), computed once per projector."""
        if self.solver != "cholesky":
            return None
        if self._chol_cache is None:
            self._chol_cache = (cholesky_factor(self.gram(), rcond=self.rcond,
                                                jac_dtype=self.operator.dtype),)
        return self._chol_cache[0]

    def _eigh(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The eigendecomposition of the Gram, computed once per projector."""
        if self._eig is None:
            rcond = self.rcond
            if rcond is None:
                rcond = default_rcond(self.num_rows, self.operator.dtype)
            self._eig = eigh_factor(self.gram(), rcond)
        return self._eig

    def _project_nograd(self, E: Tensor) -> Tuple[Tensor, Tensor, SolveInfo]:
        """``(P E, Λ, info)``."""
        X, Lam, info, _ = self._project_with_image(E, None)
        return X, Lam, info

    def _project_with_image(self, E: Tensor, image_coeffs: Optional[Tensor]):
        """``(P E, Λ, info, C J)``; ``C J`` (``None`` without ``image_coeffs`` C ``(n, B)``)
        shares the ``rmv`` of the kernel part."""
        with torch.no_grad():
            op = self.operator
            JE = op.mv(E)
            Lam, info = self.solve(JE)
            K = E.shape[0]
            if image_coeffs is None:
                X, extra = E - op.rmv(Lam), None
            else:
                W = op.rmv(torch.cat([Lam, image_coeffs.to(Lam.dtype)]))
                X, extra = torch.sub(E, W[:K], out=W[:K]), W[K:]  # (W is ours: reuse it)
            X, Lam, info.refinements = self._refine(X, Lam, JE)
            return X, Lam, info, extra

    def _refine(self, X: Tensor, Lam: Tensor, JE: Tensor) -> Tuple[Tensor, Tensor, int]:
        # Iterative refinement: J X is the float32 round-off of the first pass; one more solve
        # with the same factorisation removes most of it (benchmarks/bench_step.py measures it).
        if self.solver == "cg" or self.refine == 0:
            return X, Lam, 0
        op = self.operator
        scale = JE.norm(dim=-1).clamp_min(torch.finfo(JE.dtype).tiny)
        done = 0
        for _ in range(self.refine):
            R = op.mv(X)
            if bool((R.norm(dim=-1) <= self.refine_tol * scale).all()):
                break
            dLam, _ = self.solve(R)
            X = X - op.rmv(dLam)
            Lam = Lam + dLam
            done += 1
        return X, Lam, done

    # -- sampling the image ------------------------------------------------------------------
    @property
    def samples_image_directly(self) -> bool:
        """Whether :meth:`kernel_and_image` draws the image part from the factorisation
        (direct solvers) instead of projecting a second batch of noise."""
        return self.solver in ("eigh", "cholesky")

    def image_coefficients(self, n: int, generator: Optional[torch.Generator] = None
                           ) -> Tensor:
        """Coefficients ``C`` ``(n, B)`` with ``Cov(c) = (J Jᵀ)⁺`` per row, so that the rows of
        ``C J`` are draws of ``N(0, Jᵀ (J Jᵀ)⁺ J) = N(0, I − P)``: ``C = Z L⁻¹`` from the
        Cholesky factor ``J Jᵀ = L Lᵀ``, or ``C = Z Λ^{-½} Uᵀ`` from ``J Jᵀ = U Λ Uᵀ`` (kept
        eigenvalues only); ``Z ~ N(0, I)``."""
        G = self.gram()
        Z = torch.randn(n, G.shape[0], dtype=G.dtype, device=G.device, generator=generator)
        L = self._cholesky()
        if L is not None:
            return torch.linalg.solve_triangular(L, Z, upper=False, left=False) \
                .to(self.operator.dtype)
        evals, U, keep = self._eigh()
        half = torch.where(keep, evals.clamp_min(0).rsqrt(), torch.zeros_like(evals))
        return ((Z * half) @ U.T).to(self.operator.dtype)

    def kernel_and_image(self, E: Tensor, num_image: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``(P E, I)``: the kernel part of ``E`` ``(K, D)`` and ``num_image`` (default K)
        independent draws ``I`` of ``N(0, I − P)``.

        With a direct solver (eigh, Cholesky) the image draws are ``ν = C J``
        (:meth:`image_coefficients`) and share the kernel part's ``rmv``: one ``mv`` and one
        ``rmv`` in all, where projecting fresh noise ``η`` to ``η − P η`` would cost a second
        ``mv``, ``rmv`` and refinement. CG projects fresh noise.

        **Gradient** (when the projector is ``differentiable``, grad mode is on and the
        operator's params require grad; E itself is noise and gets none): ``P E`` as in
        :meth:`__call__`, and the image draws as ``ν − P(θ) ν`` (value ``ν``: ``P ν = 0``), whose
        implicit gradient needs no further solve (``(J Jᵀ)⁺ J ν = C``). This is an unbiased
        reparametrisation gradient: writing ``η = Pη + (I − P)η``, the term of ``η − P(θ)η``
        that it drops, ``−∂P · Pη``, is linear in ``Pη``, which has mean zero and is independent
        of the sample (Rao–Blackwellised). Otherwise both parts are constants.
        """
        E = E.reshape(-1, self.dim)
        n = E.shape[0] if num_image is None else int(num_image)
        params = self._grad_params()
        if not self.samples_image_directly:
            eta = torch.randn(n, self.dim, dtype=E.dtype, device=E.device, generator=generator)
            with torch.set_grad_enabled(bool(params)):
                both = self(torch.cat([E, eta]))
            return both[:E.shape[0]], eta - both[E.shape[0]:]
        C = self.image_coefficients(n, generator)
        X, Lam, self.info, img = self._project_with_image(E, C)
        if not params:
            return X, img
        K = E.shape[0]
        pre = (torch.cat([X, torch.zeros_like(img)]), torch.cat([Lam, C.to(Lam.dtype)]))
        out = ProjectFunction.apply(self, pre, torch.cat([E, img]), *params)
        return out[:K], img - out[K:]

    def _grad_params(self) -> Tuple[Tensor, ...]:
        """The operator's params the projection is differentiated w.r.t. now (none unless
        ``differentiable`` and grad mode is on)."""
        if not (self.differentiable and torch.is_grad_enabled()):
            return ()
        return tuple(p for p in self.operator.params if p.requires_grad)

    # -- public -----------------------------------------------------------------------------
    def __call__(self, E: Tensor) -> Tensor:
        """Kernel part ``P E`` of ``E`` (``(K, D)`` or ``(D,)``)."""
        if E.shape[-1] != self.dim:
            raise ValueError(f"vectors to project must have last dimension D={self.dim}, "
                             f"got shape {tuple(E.shape)}")
        squeeze = E.dim() == 1
        E2 = E.reshape(-1, self.dim)
        params = self._grad_params()
        if torch.is_grad_enabled() and (E2.requires_grad or params):
            X = ProjectFunction.apply(self, None, E2, *params)
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


def DenseProjector(J: Tensor, **kwargs) -> KernelProjector:
    """Projector onto ``ker J`` for an explicit ``(B, D)`` matrix J (default solver ``"auto"``:
    Cholesky, eigh when singular).

    Keyword arguments are those of :class:`KernelProjector`.
    """
    return KernelProjector(PerExampleJacobian.from_matrix(J), **kwargs)


def MatrixFreeProjector(mv, rmv, shape, *, dtype=None, device=None, params=(), bilinear=None,
                        **kwargs) -> KernelProjector:
    """Projector from ``mv(V) = V Jᵀ`` and ``rmv(U) = U J`` callables (default solver CG).

    ``params``/``bilinear`` are those of :class:`~pyro_viking.linalg.operators.CallableJacobian`;
    other keyword arguments are those of :class:`KernelProjector`.
    """
    op = CallableJacobian(mv, rmv, shape, dtype=dtype or torch.get_default_dtype(),
                          device=device, params=params, bilinear=bilinear)
    return KernelProjector(op, **kwargs)
