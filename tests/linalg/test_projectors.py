"""Kernel projectors: projection identities, singular and tall Jacobians, matrix-free CG on an
ill-conditioned problem, and gradients (implicit differentiation) against dense autograd."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import dense_projector, jacobian_with_rank

from pyro_viking.linalg import (
    ConvergenceWarning,
    DenseProjector,
    FunctionalJacobian,
    KernelProjector,
    MatrixFreeProjector,
    PerExampleJacobian,
)
from pyro_viking.linalg.layer_gram import LayerGramJacobian

SOLVERS = [dict(solver="eigh"), dict(solver="cholesky"), dict(solver="cg", rtol=1e-13)]
SOLVER_IDS = ["eigh", "cholesky", "cg"]


def _rel_jpv(J, X, V):
    return float(((X @ J.T).norm(dim=-1) / (V @ J.T).norm(dim=-1)).max())


@pytest.mark.float64_only
@pytest.mark.parametrize("kw", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("B, D, r, dup", [(6, 20, 6, 0), (10, 40, 6, 3), (30, 120, 20, 8)])
def test_projection_identities(kw, B, D, r, dup):
    J = jacobian_with_rank(B, D, r, cond=10.0, duplicates=dup)
    P = DenseProjector(J, **kw)
    V = torch.randn(5, D)
    X = P(V)
    assert X.shape == V.shape and P.info is not None and P.info.method.startswith(kw["solver"])
    assert _rel_jpv(J, X, V) <= 1e-10  # J P v = 0
    with warnings.catch_warnings():  # CG: ‖X Jᵀ‖ is rounding noise, no relative accuracy
        warnings.simplefilter("ignore", ConvergenceWarning)
        torch.testing.assert_close(P(X), X, rtol=0, atol=1e-10)  # P² = P
    assert float(((X * P.image(V)).sum(-1).abs() / V.norm(dim=-1) ** 2).max()) <= 1e-10
    torch.testing.assert_close(X, V @ dense_projector(J), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(P(V[0]), X[0])  # a single (D,) vector
    if kw["solver"] == "cg":
        assert P.rank is None and P.kernel_dim is None
    else:
        assert P.rank == r and P.kernel_dim == D - r
    torch.testing.assert_close(P.diag(), dense_projector(J).diagonal(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kw", SOLVERS, ids=SOLVER_IDS)
def test_zero_vector_projects_to_zero(kw):
    P = DenseProjector(jacobian_with_rank(5, 12, 3, duplicates=2), **kw)
    X = P(torch.zeros(2, 12))
    assert torch.equal(X, torch.zeros(2, 12))
    z = torch.zeros(12, requires_grad=True)
    (g,) = torch.autograd.grad(P(z).sum(), z)
    assert torch.isfinite(g).all()


@pytest.mark.float64_only
@pytest.mark.parametrize("kw", SOLVERS, ids=SOLVER_IDS)
def test_tall_full_column_rank_jacobian_has_trivial_kernel(kw):
    J = torch.randn(12, 5)  # B > D: J has full column rank, ker J = {0}
    P = DenseProjector(J, **kw)
    V = torch.randn(3, 5)
    torch.testing.assert_close(P(V), torch.zeros_like(V), rtol=0, atol=1e-10)
    torch.testing.assert_close(P.diag(), torch.zeros(5), rtol=0, atol=1e-10)
    if kw["solver"] != "cg":
        assert P.rank == 5 and P.kernel_dim == 0


@pytest.mark.float64_only
def test_matrix_free_cg_on_ill_conditioned_jacobian():
    J = jacobian_with_rank(128, 256, 128, cond=1e6)
    V = torch.randn(4, 256)
    for P in (KernelProjector(PerExampleJacobian.from_matrix(J), solver="cg", rtol=1e-7),
              MatrixFreeProjector(lambda W: W @ J.T, lambda U: U @ J, (128, 256), rtol=1e-7)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            X = P(V)
        assert _rel_jpv(J, X, V) <= 1e-5
        assert P.info.converged and P.info.iterations <= 128
        assert P.info.residual == pytest.approx(_rel_jpv(J, X, V), rel=1e-3)
    P = KernelProjector(PerExampleJacobian.from_matrix(J), solver="cg", rtol=1e-7, maxiter=10)
    with pytest.warns(ConvergenceWarning, match=r"after 10 iterations"):
        P(V)
    assert not P.info.converged and P.info.residual > 1e-5


def test_bad_arguments():
    P = DenseProjector(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"last dimension D=7"):
        P(torch.randn(2, 6))
    with pytest.raises(ValueError, match="solver must be one of"):
        DenseProjector(torch.randn(3, 7), solver="qr")
    with pytest.raises(ValueError, match=r"J must be a 2-D tensor of shape \(B, D\)"):
        DenseProjector(torch.randn(7))
    with pytest.raises(ValueError, match="J contains non-finite"):
        DenseProjector(torch.tensor([[1.0, float("nan")]]))
    J = torch.tensor([[1.0, float("inf")]])
    P = MatrixFreeProjector(lambda W: W @ J.T, lambda U: U @ J, (1, 2), solver="eigh")
    with pytest.raises(ValueError, match="J contains non-finite"):
        P(torch.ones(2))


# -- gradients ---------------------------------------------------------------------------------
def _grads(out, C, inputs):
    return torch.autograd.grad((out * C).sum(), inputs)


def _assert_gradients_match_dense(J, E, C, kw):
    """The gradients w.r.t. E and J of ``⟨C, P E⟩`` equal autograd through the dense P."""
    got = _grads(DenseProjector(J, **kw)(E), C, (E, J))
    ref = _grads(E @ dense_projector(J), C, (E, J))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.float64_only
@pytest.mark.parametrize("kw", SOLVERS, ids=SOLVER_IDS)
def test_gradient_matches_dense_autograd(kw):
    J = jacobian_with_rank(4, 9, 4, cond=5.0).requires_grad_()
    E = torch.randn(3, 9, requires_grad=True)
    C = torch.randn(3, 9)  # random cotangent
    _assert_gradients_match_dense(J, E, C, kw)


@pytest.mark.float64_only
@pytest.mark.parametrize("kw", SOLVERS, ids=SOLVER_IDS)
def test_gradient_with_dependent_cotangent_rows(kw):
    """The backward works on a basis of the cotangents' span: 4 rows of rank 2 (as an AutoViking
    draw gives: kernel and image rows with cotangents σ_ker ḡ and −σ_im ḡ) and an all-zero one."""
    J = jacobian_with_rank(4, 9, 4, cond=5.0).requires_grad_()
    E = torch.randn(5, 9, requires_grad=True)
    g = torch.randn(2, 9)
    C = torch.stack([0.7 * g[0], 0.7 * g[1], -0.2 * g[0], -0.2 * g[1], torch.zeros(9)])
    _assert_gradients_match_dense(J, E, C, kw)


@pytest.mark.float64_only
@pytest.mark.parametrize("kw", SOLVERS, ids=SOLVER_IDS)
def test_gradcheck(kw):
    J = jacobian_with_rank(3, 6, 3, cond=3.0).requires_grad_()
    E = torch.randn(2, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, j: DenseProjector(j, **kw)(e), (E, J))


@pytest.mark.float64_only
def test_gradient_wrt_vectors_with_rank_deficient_jacobian():
    J = jacobian_with_rank(8, 15, 4, duplicates=3)
    E = torch.randn(2, 15, requires_grad=True)
    C = torch.randn(2, 15)
    for kw in SOLVERS:
        (g,) = _grads(DenseProjector(J, **kw)(E), C, (E,))
        torch.testing.assert_close(g, C @ dense_projector(J), rtol=1e-8, atol=1e-10)


@pytest.mark.float64_only
def test_non_differentiable_projection_keeps_vector_gradient():
    J = jacobian_with_rank(4, 9, 4).requires_grad_()
    E = torch.randn(3, 9, requires_grad=True)
    C = torch.randn(3, 9)
    out = DenseProjector(J, differentiable=False)(E)
    gE, gJ = torch.autograd.grad((out * C).sum(), (E, J), allow_unused=True)
    assert gJ is None
    torch.testing.assert_close(gE, C @ dense_projector(J.detach()), rtol=1e-8, atol=1e-10)


@pytest.mark.float64_only
def test_gradient_through_matrix_free_operator_params():
    J = jacobian_with_rank(4, 9, 4, cond=5.0).requires_grad_()
    E, C = torch.randn(3, 9, requires_grad=True), torch.randn(3, 9)
    P = MatrixFreeProjector(lambda W: W @ J.T, lambda U: U @ J, (4, 9), params=(J,), rtol=1e-13)
    got = _grads(P(E), C, (E, J))
    ref = _grads(E @ dense_projector(J), C, (E, J))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.float64_only
@pytest.mark.parametrize("solver", ["eigh", "cg"])
def test_gradient_through_functional_jacobian(solver):
    # J(θ) = diag(f'(Aθ)) A, f(u) = tanh u + 0.1 u²: A has orthonormal rows and Aθ = u ∈ [0.2, 1],
    # where f' = sech² u + 0.2 u is far from its zero, so J Jᵀ = diag(f'(u)²) is well conditioned.
    A, u, w = jacobian_with_rank(3, 7, 3), torch.tensor([0.2, 0.6, 1.0]), torch.randn(7)

    def fn(theta):
        return torch.tanh(A @ theta) + 0.1 * (A @ theta) ** 2

    theta = (A.T @ u + w - A.T @ (A @ w)).requires_grad_()  # Aθ = u, a random kernel part
    E, C = torch.randn(2, 7, requires_grad=True), torch.randn(2, 7)
    P = KernelProjector(FunctionalJacobian(fn, theta), solver=solver, rtol=1e-13)
    got = _grads(P(E), C, (E, theta))
    J = torch.autograd.functional.jacobian(fn, theta, create_graph=True)
    ref = _grads(E @ dense_projector(J), C, (E, theta))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)
    assert torch.autograd.gradcheck(
        lambda e, t: KernelProjector(FunctionalJacobian(fn, t), solver=solver, rtol=1e-13)(e),
        (E.detach()[:1].requires_grad_(), theta))


# -- properties --------------------------------------------------------------------------------
@pytest.mark.float64_only
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 8), D=st.integers(1, 12), r=st.integers(0, 8), dup=st.integers(0, 3),
       K=st.integers(1, 3), solver=st.sampled_from(["eigh", "cholesky", "cg"]),
       seed=st.integers(0, 2**31 - 1))
def test_projector_invariants(B, D, r, dup, K, solver, seed):
    g = torch.Generator().manual_seed(seed)
    r = min(r, B, D)
    dup = min(dup, B - max(r, 1))
    J = jacobian_with_rank(B, D, r, duplicates=dup, generator=g)
    P = DenseProjector(J, solver=solver, rtol=1e-12)
    V = torch.randn(K, D, generator=g)
    X = P(V)
    assert X.shape == (K, D) and P(V[0]).shape == (D,)
    assert torch.isfinite(X).all()
    assert float((X @ J.T).norm()) <= 1e-9 * float(V.norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        torch.testing.assert_close(P(X), X, rtol=0, atol=1e-9)
    assert float((X * (V - X)).sum(-1).abs().max()) <= 1e-9 * float(V.norm()) ** 2
    d = P.diag()
    assert d.shape == (D,) and bool((d > -1e-9).all() and (d < 1 + 1e-9).all())
    assert float(d.sum()) == pytest.approx(D - r, abs=1e-8)
    if solver != "cg":
        assert P.kernel_dim == D - r


def test_gradient_through_constant_jacobian_is_zero_not_an_error():
    # J that does not depend on theta (a model linear in theta, output Jacobian)
    A = torch.randn(3, 7)
    theta = torch.randn(7, requires_grad=True)
    proj = KernelProjector(FunctionalJacobian(lambda z: A @ z, theta))
    E = torch.randn(2, 7, requires_grad=True)
    proj(E).pow(2).sum().backward()
    assert theta.grad is None or torch.all(theta.grad == 0)
    P = torch.eye(7) - torch.linalg.pinv(A) @ A
    torch.testing.assert_close(E.grad, 2 * (E.detach() @ P) @ P)


# ----------------------------------------------------------------- kernel part + image draws
@pytest.mark.float64_only
@pytest.mark.parametrize("solver, rank, method", [
    ("cholesky", 4, "cholesky"), ("cholesky", 3, "cholesky->eigh"), ("eigh", 3, "eigh"),
    ("cg", 3, "cg")])
def test_kernel_and_image_draws_have_the_exact_law(solver, rank, method):
    """``kernel_and_image(E)`` returns ``P E`` and fresh draws of ``N(0, I − P)``: the kernel part
    against the dense projector (1e-10), the draws' empirical covariance against ``I − P``
    (40,000 draws: the entries' standard error is ≤ 1/√40000 = 0.005; tolerance 0.025)."""
    torch.manual_seed(0)
    D = 7
    J = jacobian_with_rank(4, D, rank, cond=5.0)  # rank 3 of 4 rows: a singular Gram
    P_ref = dense_projector(J)
    proj = KernelProjector(PerExampleJacobian.from_matrix(J), solver=solver, rtol=1e-13,
                           differentiable=False)
    E = torch.randn(3, D)
    K, img = proj.kernel_and_image(E, num_image=40_000)
    assert proj.info.method == method
    torch.testing.assert_close(K, E @ P_ref, rtol=0, atol=1e-10)
    assert img.shape == (40_000, D)
    torch.testing.assert_close(img.T @ img / img.shape[0], torch.eye(D) - P_ref, rtol=0,
                               atol=0.025)
    # the draws lie in the image (row space of J) up to round-off
    assert float((img @ P_ref).abs().max()) < 1e-10


@pytest.mark.float64_only
def test_auto_solver_is_cholesky_for_a_cheap_gram_and_falls_back_when_singular():
    J = jacobian_with_rank(5, 12, 5, cond=10.0)
    P = KernelProjector(PerExampleJacobian.from_matrix(J))
    assert P.solver == "cholesky" and P.samples_image_directly
    P(torch.randn(2, 12))
    assert P.info.method == "cholesky" and P.kernel_dim == 7
    Js = jacobian_with_rank(5, 12, 3, duplicates=2)
    Ps = KernelProjector(PerExampleJacobian.from_matrix(Js))
    X = Ps(torch.randn(2, 12))
    assert Ps.info.method == "cholesky->eigh" and Ps.kernel_dim == 9
    assert float((X @ Js.T).abs().max()) < 1e-10
    cg = KernelProjector(PerExampleJacobian.from_matrix(J), solver="cg")
    assert not cg.samples_image_directly


@pytest.mark.float64_only
def test_refinement_runs_only_while_the_residual_exceeds_refine_tol():
    """A float32 Jacobian with a condition number of 10⁴ leaves a first-pass residual far above
    1e-6 (refined); float64 leaves ~1e-15 (no pass, only its check); ``refine_tol=0`` always
    refines."""
    g = torch.Generator().manual_seed(3)
    J64 = jacobian_with_rank(40, 300, 40, cond=1e4, generator=g)
    E = torch.randn(2, 300, generator=g)
    P64 = KernelProjector(PerExampleJacobian.from_matrix(J64))
    P64(E)
    assert P64.info.refinements == 0
    P64_always = KernelProjector(PerExampleJacobian.from_matrix(J64), refine_tol=0.0)
    P64_always(E)
    assert P64_always.info.refinements == 1
    J32, E32 = J64.float(), E.float()
    first = KernelProjector(PerExampleJacobian.from_matrix(J32), refine=0)
    X0 = first(E32)
    res0 = _rel_jpv(J64, X0.double(), E)
    assert res0 > 1e-6 and first.info.refinements == 0
    P32 = KernelProjector(PerExampleJacobian.from_matrix(J32))
    X1 = P32(E32)
    assert P32.info.refinements == 1 and _rel_jpv(J64, X1.double(), E) < res0 / 10
    with pytest.raises(ValueError, match="refine"):
        KernelProjector(PerExampleJacobian.from_matrix(J32), refine=-1)


def test_auto_solver_with_explicit_rcond_is_eigh():
    """An explicit ``rcond`` keeps the exact pseudo-inverse semantics (eigh): a Cholesky pivot
    can clear it while a smaller eigenvalue hides behind it."""
    J = jacobian_with_rank(5, 12, 5, cond=100.0)  # eigenvalues of J Jᵀ: 1, 0.1, …, 1e-4
    P = KernelProjector(PerExampleJacobian.from_matrix(J), rcond=5e-4)
    assert P.solver == "eigh"
    P(torch.randn(1, 12))
    assert P.rank == 4  # the 1e-4 eigenvalue is dropped
    assert KernelProjector(PerExampleJacobian.from_matrix(J)).solver == "cholesky"


@pytest.mark.float64_only
@pytest.mark.parametrize("solver, rank", [("cholesky", 4), ("eigh", 3), ("cg", 4)])
def test_kernel_and_image_gradient_matches_dense_autograd(solver, rank):
    """Differentiable ``kernel_and_image``: ``P E`` and the image draw ``ν − P ν`` (direct
    solvers: ν = C J drawn from the factorisation; CG: ν = η − P η of fresh noise η) have the
    gradients w.r.t. J of autograd through a dense projection evaluated at the same draws."""
    J = jacobian_with_rank(4, 9, rank, cond=5.0).requires_grad_()
    E = torch.randn(3, 9)
    P = DenseProjector(J, solver=solver, rtol=1e-13)
    gen = torch.Generator().manual_seed(5)
    k, img = P.kernel_and_image(E, num_image=2, generator=gen)
    assert k.requires_grad and img.requires_grad and img.shape == (2, 9)
    Pd = dense_projector(J)
    if solver == "cg":  # the same fresh noise
        eta = torch.randn(2, 9, generator=torch.Generator().manual_seed(5))
        ref_img = eta - eta @ Pd
    else:
        nu = img.detach()
        ref_img = nu - nu @ Pd
        torch.testing.assert_close(nu @ Pd.detach(), torch.zeros_like(nu), rtol=0, atol=1e-10)
    ref_k = E @ Pd
    torch.testing.assert_close(k, ref_k, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(img, ref_img, rtol=1e-8, atol=1e-10)
    Ck, Ci = torch.randn(3, 9), torch.randn(2, 9)
    (got,) = torch.autograd.grad((k * Ck).sum() + (img * Ci).sum(), J)
    (ref,) = torch.autograd.grad((ref_k * Ck).sum() + (ref_img * Ci).sum(), J)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)


def test_kernel_and_image_is_constant_without_gradient_through_p():
    J = jacobian_with_rank(4, 9, 4).requires_grad_()
    for P in (DenseProjector(J, differentiable=False), DenseProjector(J)):
        with torch.set_grad_enabled(P.differentiable is False):
            k, img = P.kernel_and_image(torch.randn(2, 9))
        assert not k.requires_grad and not img.requires_grad


def test_image_draw_gradient_is_unbiased_for_the_projected_noise_gradient():
    """E[∇_J φ(ν − P(J)ν)] with ν = C J (``kernel_and_image``) equals E[∇_J φ(η − P(J)η)] with
    η ~ N(0, I) (the reparametrisation through projected fresh noise) for a non-linear φ: the
    dropped term −∂P·Pη has mean zero given the sample. 40 batches of 200 draws each; the batch
    means agree within 5 standard errors, and the new route's spread is not larger."""
    torch.manual_seed(3)
    J = jacobian_with_rank(3, 6, 3, cond=3.0).requires_grad_()
    R = torch.randn(6, 4)
    batches, n = 40, 200

    def grad_of_mean(img):
        return torch.autograd.grad(torch.cos(img @ R).sum(-1).mean(), J)[0].flatten()

    new, old = [], []
    for _ in range(batches):
        P = DenseProjector(J, solver="cholesky")
        new.append(grad_of_mean(P.kernel_and_image(torch.zeros(1, 6), num_image=n)[1]))
        eta = torch.randn(n, 6)
        old.append(grad_of_mean(eta - DenseProjector(J, solver="cholesky")(eta)))
    new, old = torch.stack(new), torch.stack(old)
    diff = new.mean(0) - old.mean(0)
    se = ((new.var(0) + old.var(0)) / batches).sqrt()
    assert bool((diff.abs() <= 5 * se + 1e-12).all()), float((diff / se).abs().max())
    assert float(new.var(0).sum()) <= 1.1 * float(old.var(0).sum())  # Rao–Blackwellised


@pytest.mark.parametrize("make", [PerExampleJacobian, LayerGramJacobian, FunctionalJacobian])
def test_implicit_gradient_when_rows_do_not_depend_on_theta(dtype, make):
    """Rows independent of θ (no autograd graph at all): P = I, the gradient w.r.t. the vectors
    is the cotangent and θ gets none (no 'does not require grad' error)."""
    x = torch.randn(5)
    theta = torch.randn(3, requires_grad=True)
    proj = KernelProjector(make(lambda z: x.clone(), theta))
    E = torch.randn(2, 3, requires_grad=True)
    C = torch.randn(2, 3)
    (proj(E) * C).sum().backward()
    torch.testing.assert_close(E.grad, C)
    assert theta.grad is None or torch.all(theta.grad == 0)
    assert proj.rank in (0, None)  # None: CG, which does not know the rank
