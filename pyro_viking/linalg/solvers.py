"""Solvers for the small Gram system ``(J Jᵀ) Λ = R`` with K right-hand sides at once.

Right-hand sides and solutions are stored as rows: ``R`` and ``Λ`` are ``(K, B)`` and the
system reads ``Λ G = R`` with ``G = J Jᵀ`` symmetric positive semi-definite. ``G`` is singular
whenever two rows of J are dependent (duplicated data, saturated outputs); since
``R = V Jᵀ`` always lies in the range of ``G``, the minimum-norm solution ``Λ = R G⁺`` is the one
that yields the orthogonal projection, and every solver here returns it (never a NaN).

Every solver returns ``(Λ, SolveInfo)``; a solver that stops short of its tolerance warns with
its residual and a remedy (:class:`ConvergenceWarning`).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from pyro_viking.user_warnings import warn as warn_user

__all__ = [
    "ConvergenceWarning", "SolveInfo", "cg_solve", "cholesky_factor", "cholesky_solve",
    "default_rcond", "eigh_factor", "eigh_solve",
]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class SolveInfo:
    """Diagnostics of one solve.

    :ivar method: ``"cg"``, ``"eigh"`` or ``"cholesky"`` (``"cholesky->eigh"`` on fallback).
    :ivar iterations: iterations run (0 for direct solvers).
    :ivar residual: largest relative residual ``‖r_k − Λ_k G‖ / ‖r_k‖`` over the K columns.
        For ``R = V Jᵀ`` this equals the projection accuracy ``‖J P v‖ / ‖J v‖``. A direct
        solver passes it as a function, evaluated when first read (a training step never
        reads it: it would cost a product with G and a device synchronisation per solve).
    :ivar converged: whether every column met the tolerance.
    :ivar rank: numerical rank of G (direct solvers), else ``None``.
    :ivar refinements: iterative-refinement passes the projection applied after this solve.
    """

    __slots__ = ("method", "iterations", "_residual", "converged", "rank", "refinements")

    def __init__(self, method: str, iterations: int, residual: Union[float, Callable[[], float]],
                 converged: bool, rank: Optional[int] = None, refinements: int = 0):
        self.method, self.iterations, self._residual = method, iterations, residual
        self.converged, self.rank, self.refinements = converged, rank, refinements

    @property
    def residual(self) -> float:
        if callable(self._residual):
            self._residual = float(self._residual())
        return self._residual

    @residual.setter
    def residual(self, value: float) -> None:
        self._residual = value

    def _fields(self) -> tuple:
        return (self.method, self.iterations, self.residual, self.converged, self.rank,
                self.refinements)

    def __eq__(self, other) -> bool:
        return isinstance(other, SolveInfo) and self._fields() == other._fields()

    def __repr__(self) -> str:
        names = ("method", "iterations", "residual", "converged", "rank", "refinements")
        return "SolveInfo(" + ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields())) \
            + ")"


def _relative_residual(R: Tensor, Lam: Tensor, matvec: Callable[[Tensor], Tensor]) -> float:
    res = (R - matvec(Lam)).norm(dim=-1)
    scale = R.norm(dim=-1)
    rel = torch.where(scale > 0, res / scale.clamp_min(torch.finfo(R.dtype).tiny), res)
    return float(rel.max()) if rel.numel() else 0.0


def cg_solve(
    matvec: Callable[[Tensor], Tensor],
    R: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    reorthogonalize: bool = True,
    warn: bool = True,
) -> Tuple[Tensor, SolveInfo]:
    """Conjugate gradients for ``Λ G = R``, all K columns in lock-step.

    :param matvec: ``(K, B) -> (K, B)``, ``X ↦ X G`` (G symmetric PSD).
    :param R: right-hand sides, ``(K, B)``.
    :param rtol, atol: column k stops when ``‖r_k‖ ≤ max(rtol ‖R_k‖, atol)``; stopped columns
        are frozen while the others continue.
    :param maxiter: iteration cap (default ``B``; exact arithmetic needs at most ``rank G``).
    :param reorthogonalize: Gram–Schmidt every new residual against all previous (normalised)
        residuals. Keeps Krylov vectors orthogonal in floating point, which plain CG loses on the
        ill-conditioned Gram matrices of trained networks.
    :returns: ``(Λ, info)``. A column whose curvature ``pᵀGp/‖p‖²`` vanishes relative to the
        largest seen (breakdown: the residual left lies in the null space of G) is frozen, not
        divided by (almost) zero.
    """
    K, B = R.shape
    maxiter = B if maxiter is None else int(maxiter)
    X = torch.zeros_like(R)
    r = R.clone()
    p = r.clone()
    rs = (r * r).sum(-1)
    bnorm = R.norm(dim=-1)
    tol = torch.clamp(rtol * bnorm, min=atol)
    done = r.norm(dim=-1) <= tol
    tiny = torch.finfo(R.dtype).tiny
    # Curvature pᵀGp/‖p‖² below 10·B·eps × the largest seen (any column) is rounding noise: p lies
    # in the null space of G (what is left of R there is noise), and dividing by it would blow
    # the iterate up along null directions, whose rounding error then spoils Λ J.
    noise_curv = 10.0 * B * torch.finfo(R.dtype).eps
    max_curv = torch.zeros((), dtype=R.dtype, device=R.device)
    basis = [] if reorthogonalize else None
    if reorthogonalize:
        basis.append(r / r.norm(dim=-1, keepdim=True).clamp_min(tiny))
    it = 0
    while it < maxiter and not bool(done.all()):
        it += 1
        Gp = matvec(p)
        pGp = (p * Gp).sum(-1)
        curv = pGp / (p * p).sum(-1).clamp_min(tiny)
        max_curv = torch.maximum(max_curv, torch.where(done, 0.0, curv).max())
        active = ~done & (pGp > tiny * 1e4) & (curv > noise_curv * max_curv)
        alpha = torch.where(active, rs / torch.where(active, pGp, torch.ones_like(pGp)), 0.0)
        X = X + alpha[:, None] * p
        r = r - alpha[:, None] * Gp
        if reorthogonalize:
            Q = torch.stack(basis, dim=1)  # (K, it, B)
            coef = torch.einsum("kib,kb->ki", Q, r)
            r = r - torch.einsum("kib,ki->kb", Q, coef) * active[:, None]
            basis.append(r / r.norm(dim=-1, keepdim=True).clamp_min(tiny))
        rs_new = (r * r).sum(-1)
        done = done | ~active | (rs_new.sqrt() <= tol)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(tiny), 0.0)
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
    residual = _relative_residual(R, X, matvec)
    converged = bool((residual <= rtol) or (R - matvec(X)).norm(dim=-1).max() <= atol)
    if warn and not converged:
        warn_user(f"CG stopped after {it} iterations with relative residual {residual:.2e} "
                  f"> rtol={rtol:.1e}; the projection is inaccurate (‖JPv‖/‖Jv‖ ≈ residual). "
                  "Increase maxiter, loosen rtol, or use a direct solver (solver='eigh').",
                  ConvergenceWarning)
    return X, SolveInfo("cg", it, residual, converged)


def default_rcond(B: int, dtype: torch.dtype) -> float:
    """Relative threshold on the eigenvalues ``λ = σ²`` of the float64 Gram ``J Jᵀ``:
    ``max((B · eps_J)², 10 · B · eps_64)``.

    The eigenvalues are squared singular values, so J's own precision ``eps_J`` resolves them
    down to ``(B eps_J)² λ_max``; forming and factorising the Gram in float64 adds a floor of
    ``10 B eps_64``. (A threshold of ``B eps_J`` on ``λ`` would drop every direction with
    ``σ < √(B eps_J) σ_max`` and leave a projection residual ``‖JPv‖/‖Jv‖`` of that order.)
    """
    return max((B * torch.finfo(dtype).eps) ** 2, 10.0 * B * torch.finfo(torch.float64).eps)


def eigh_factor(G: Tensor, rcond: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(λ, U, keep)`` with ``G = U diag(λ) Uᵀ`` and ``keep = λ > rcond · max λ``."""
    evals, U = torch.linalg.eigh(G)
    keep = evals > rcond * evals.max().clamp_min(0.0)
    return evals, U, keep


def eigh_solve(
    G: Tensor, R: Tensor, *, rcond: Optional[float] = None,
    jac_dtype: Optional[torch.dtype] = None,
    factor: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> Tuple[Tensor, SolveInfo]:
    """Pseudo-inverse solve ``Λ = R G⁺`` through ``G = U diag(λ) Uᵀ``.

    Eigenvalues ``λ_j ≤ rcond · max λ`` are treated as zero, so a singular G (dependent rows
    of J) gives the minimum-norm solution. ``rank`` in the diagnostics counts the others.

    :param G: ``(B, B)`` symmetric PSD (float64 recommended).
    :param R: ``(K, B)``; the solution is returned in R's dtype.
    :param rcond: relative threshold; default :func:`default_rcond` for ``jac_dtype``
        (the precision in which J was computed, default R's dtype).
    :param factor: a cached :func:`eigh_factor` of G (then ``rcond`` is ignored).
    """
    B = G.shape[-1]
    if factor is None:
        rcond = default_rcond(B, jac_dtype or R.dtype) if rcond is None else rcond
        factor = eigh_factor(G, rcond)
    evals, U, keep = factor
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    R64 = R.to(G.dtype)
    Lam = ((R64 @ U) * inv) @ U.T
    info = SolveInfo("eigh", 0, lambda: _relative_residual(R64, Lam, lambda X: X @ G), True,
                     int(keep.sum()))
    return Lam.to(R.dtype), info


#: Cholesky pivots ``L_ii² ≤ CHOLESKY_PIVOT_FLOOR · max G_ii`` count as singular whatever
#: ``rcond``: a numerically singular float64 Gram often factorises anyway, with rounding-noise
#: pivots far above ``eps · max G_ii``.
CHOLESKY_PIVOT_FLOOR = 1e-10


def cholesky_factor(G: Tensor, *, rcond: Optional[float] = None,
                    jac_dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """Lower Cholesky factor L of ``G = L Lᵀ``, or ``None`` when G is numerically singular:
    the factorisation fails, or a pivot ``L_ii²`` is at most
    ``max(rcond, CHOLESKY_PIVOT_FLOOR) · max G_ii`` (``rcond`` default :func:`default_rcond`).
    Every pivot bounds an eigenvalue from above (``L_ii² ≥ λ_min``), so a small pivot always
    means a small eigenvalue; a false alarm only costs an eigendecomposition."""
    L, status = torch.linalg.cholesky_ex(G)
    B = G.shape[-1]
    rc = default_rcond(B, jac_dtype or G.dtype) if rcond is None else rcond
    tol = max(rc, CHOLESKY_PIVOT_FLOOR) * G.diagonal().max()
    # one synchronisation for both tests (a failed factorisation's pivots are not read)
    singular = (status != 0) | ~(L.diagonal().pow(2).min() > tol)
    return None if bool(singular) else L


def cholesky_solve(
    G: Tensor, R: Tensor, *, rcond: Optional[float] = None, jac_dtype: Optional[torch.dtype] = None,
    factor: Optional[Tensor] = None,
) -> Tuple[Tensor, SolveInfo]:
    """Solve ``Λ G = R`` by Cholesky of G (full rank: ``rank = B``).

    A numerically singular G (see :func:`cholesky_factor`) falls back to :func:`eigh_solve`
    and reports ``method="cholesky->eigh"``. ``factor``: a cached :func:`cholesky_factor`.
    """
    L = factor if factor is not None else cholesky_factor(G, rcond=rcond,
                                                          jac_dtype=jac_dtype or R.dtype)
    if L is None:
        Lam, info = eigh_solve(G, R, rcond=rcond, jac_dtype=jac_dtype)
        info.method = "cholesky->eigh"
        return Lam, info
    B = G.shape[-1]
    R64 = R.to(G.dtype)
    Lam = torch.cholesky_solve(R64.T, L).T
    info = SolveInfo("cholesky", 0, lambda: _relative_residual(R64, Lam, lambda X: X @ G), True,
                     B)
    return Lam.to(R.dtype), info
