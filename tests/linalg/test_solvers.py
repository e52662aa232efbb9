"""Gram solvers: CG iterate parity with SciPy, convergence to dense solves, pseudo-inverse
behaviour on singular systems, fallbacks, warnings and diagnostics."""

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import jacobian_with_rank, spd_matrix

from pyro_viking.linalg import ConvergenceWarning, SolveInfo, cg_solve, cholesky_solve, eigh_solve
from pyro_viking.linalg.solvers import default_rcond


def _rows(G):
    return lambda X: X @ G


def _scipy_cg(G, b, maxiter):
    x, _ = spla.cg(G.numpy(), b.numpy(), x0=np.zeros(len(b)), rtol=1e-300, atol=0.0,
                   maxiter=maxiter)
    return torch.from_numpy(x)


@pytest.mark.float64_only
@pytest.mark.parametrize("reorthogonalize", [True, False])
@pytest.mark.parametrize("K", [1, 3], ids=["vector", "matrix"])
@pytest.mark.parametrize("maxiter", [1, 3])
def test_cg_iterates_match_scipy(maxiter, K, reorthogonalize):
    G = spd_matrix(12, cond=50.0)
    R = torch.randn(K, 12)
    with pytest.warns(ConvergenceWarning):
        X, info = cg_solve(_rows(G), R, rtol=1e-14, maxiter=maxiter,
                           reorthogonalize=reorthogonalize)
    assert info.iterations == maxiter and not info.converged
    expected = torch.stack([_scipy_cg(G, r, maxiter) for r in R])
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.float64_only
@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_cg_converges_to_dense_solve(reorthogonalize):
    n = 30
    G = spd_matrix(n, cond=1e3)
    R = torch.randn(4, n)
    X, info = cg_solve(_rows(G), R, rtol=1e-12, reorthogonalize=reorthogonalize,
                       maxiter=3 * n)
    expected = torch.linalg.solve(G, R.T).T
    torch.testing.assert_close(X, expected, rtol=1e-8, atol=1e-10)
    assert info.converged and info.residual <= 1e-12 and info.method == "cg"
    assert 0 < info.iterations <= 3 * n and info.rank is None
    # the residual reported is the true relative residual
    true_res = ((R - X @ G).norm(dim=-1) / R.norm(dim=-1)).max()
    assert info.residual == pytest.approx(float(true_res), rel=1e-6, abs=1e-15)


@pytest.mark.float64_only
def test_cg_singular_consistent_gives_pinv_solution():
    J = jacobian_with_rank(10, 25, 6, duplicates=3)  # G = J Jᵀ of rank 6
    G = J @ J.T
    R = torch.randn(5, 25) @ J.T  # consistent: R in range(G)
    X, info = cg_solve(_rows(G), R, rtol=1e-12)
    expected = R @ torch.linalg.pinv(G, hermitian=True)
    torch.testing.assert_close(X, expected, rtol=1e-8, atol=1e-9)
    assert info.converged and info.iterations <= 10


def test_cg_zero_rhs_and_breakdown_give_no_nan():
    G = spd_matrix(6, rank=3)
    R = torch.zeros(2, 6)
    X, info = cg_solve(_rows(G), R)
    assert torch.equal(X, torch.zeros_like(R)) and info.converged and info.iterations == 0
    # a column entirely in the null space of G: curvature pᵀGp = 0, frozen instead of dividing
    Q = torch.linalg.eigh(G).eigenvectors[:, :3].T  # null-space directions (eigenvalue 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        X, info = cg_solve(_rows(G), torch.cat([Q[:1], torch.randn(1, 6) @ G]), rtol=1e-12)
    assert torch.isfinite(X).all() and info.iterations <= 6


def test_cg_warns_with_residual_and_remedy_when_maxiter_too_small():
    G = spd_matrix(40, cond=1e4)
    R = torch.randn(2, 40)
    with pytest.warns(ConvergenceWarning, match=r"relative residual .* Increase maxiter"):
        _, info = cg_solve(_rows(G), R, rtol=1e-10, maxiter=4)
    assert not info.converged and info.iterations == 4 and info.residual > 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = cg_solve(_rows(G), R, rtol=1e-10, maxiter=4, warn=False)
    assert not info.converged


def test_cg_atol_stops_early():
    G = spd_matrix(20, cond=1e2)
    R = torch.randn(1, 20)
    X, info = cg_solve(_rows(G), R, rtol=0.0, atol=1e-3 * float(R.norm()))
    assert info.converged and float((R - X @ G).norm()) <= 1e-3 * float(R.norm())


@pytest.mark.float64_only
@pytest.mark.parametrize("solve", [eigh_solve, cholesky_solve])
def test_direct_solvers_full_rank(solve):
    G = spd_matrix(15, cond=1e4)
    R = torch.randn(3, 15)
    X, info = solve(G, R)
    torch.testing.assert_close(X, torch.linalg.solve(G, R.T).T, rtol=1e-9, atol=1e-10)
    assert info == SolveInfo(solve.__name__.split("_")[0], 0, info.residual, True, 15)
    assert info.residual < 1e-12


@pytest.mark.float64_only
@pytest.mark.parametrize("solve, method", [(eigh_solve, "eigh"),
                                           (cholesky_solve, "cholesky->eigh")])
@pytest.mark.parametrize("duplicates", [0, 3])
def test_direct_solvers_singular_give_pinv_and_rank(solve, method, duplicates):
    J = jacobian_with_rank(12, 30, 7, duplicates=duplicates)
    G = J @ J.T
    R = torch.randn(4, 30) @ J.T
    X, info = solve(G, R)
    torch.testing.assert_close(X, R @ torch.linalg.pinv(G, hermitian=True), rtol=1e-8,
                               atol=1e-9)
    assert info.method == method and info.rank == 7 and info.converged
    assert info.residual < 1e-12 and torch.isfinite(X).all()


@pytest.mark.float64_only
@settings(max_examples=25, deadline=None)
@given(B=st.integers(2, 12), r=st.integers(1, 11), dup=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_cholesky_never_reports_full_rank_on_singular_gram(B, r, dup, seed):
    """Regression: Cholesky may 'succeed' on a numerically singular Gram with noise pivots."""
    g = torch.Generator().manual_seed(seed)
    r = min(r, B - 1)
    dup = min(dup, B - r)
    J = jacobian_with_rank(B, 3 * B, r, duplicates=dup, generator=g)
    X, info = cholesky_solve(J @ J.T, torch.randn(2, 3 * B, generator=g) @ J.T)
    assert info.method == "cholesky->eigh" and info.rank == r


@pytest.mark.float64_only
def test_direct_solver_precision_and_rcond():
    G = spd_matrix(8, cond=1e3)
    R = torch.randn(2, 8, dtype=torch.float32)
    X, info = eigh_solve(G, R)
    assert X.dtype == torch.float32 and info.rank == 8
    # an rcond above the smallest relative eigenvalue drops it (rank 7)
    _, info = eigh_solve(G, R.double(), rcond=2e-3)
    assert info.rank == 7
    # The threshold is on λ = σ²: float32 J resolves λ down to (B·eps32)² ≈ 9.1e-13, float64 down
    # to the Gram's floor 10·B·eps64 ≈ 1.8e-14. G15's eigenvalues are 1, 7.2e-3, …, 1.4e-13, 1e-15.
    assert default_rcond(8, torch.float32) == pytest.approx((8 * torch.finfo(torch.float32).eps)
                                                            ** 2)
    assert default_rcond(8, torch.float64) == pytest.approx(80 * torch.finfo(torch.float64).eps)
    G15 = spd_matrix(8, cond=1e15)
    assert eigh_solve(G15, R.double())[1].rank == 7
    assert eigh_solve(G15, R.double(), jac_dtype=torch.float32)[1].rank == 6


@pytest.mark.float64_only
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 10), K=st.integers(1, 4), rank=st.integers(1, 10),
       seed=st.integers(0, 2**31 - 1))
def test_solvers_agree_on_random_psd(B, K, rank, seed):
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, B)
    J = jacobian_with_rank(B, B + 3, rank, cond=10.0, generator=g)
    G = J @ J.T
    R = torch.randn(K, B + 3, generator=g) @ J.T
    expected = R @ torch.linalg.pinv(G, hermitian=True)
    for solve in (eigh_solve, cholesky_solve):
        X, info = solve(G, R)
        assert X.shape == R.shape and info.rank == rank
        torch.testing.assert_close(X, expected, rtol=1e-7, atol=1e-8)
    X, info = cg_solve(_rows(G), R, rtol=1e-12, maxiter=4 * B)
    assert X.shape == R.shape and info.converged and info.iterations <= 4 * B
    assert isinstance(info.residual, float) and 0.0 <= info.residual <= 1e-12
    torch.testing.assert_close(X, expected, rtol=1e-6, atol=1e-7)
