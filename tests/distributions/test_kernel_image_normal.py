"""KernelImageNormal against its dense twin MultivariateNormal(loc, σ_k²P + σ_i²(I−P)):
densities, moments, sampling, shapes, kernel-dimension estimators, gradients and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import (
    dense_covariance,
    dense_projector,
    dense_twin,
    jacobian_with_rank,
    linear_model_jacobian,
)
from torch.distributions import constraints

from pyro_viking.distributions import KernelImageNormal, KernelImageNormalBase
from pyro_viking.linalg import DenseProjector, MatrixFreeProjector

CASES = [(6, 20, 4, 2), (30, 120, 20, 6), (60, 200, 45, 10)]  # B, D, rank r < B, duplicated rows


def _make(B, D, r, dup, batch=(), **kw):
    J = jacobian_with_rank(B, D, r, cond=30.0, duplicates=dup)
    loc = torch.randn(*batch, D)
    sk = torch.rand(batch) + 0.5
    si = torch.rand(batch) * 0.2 + 0.05
    return KernelImageNormal(loc, sk, si, DenseProjector(J), **kw), J


def _rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.float64_only
@pytest.mark.parametrize("B, D, r, dup", CASES)
@pytest.mark.parametrize("batch", [(), (3,)])
def test_log_prob_and_entropy_match_dense_twin(B, D, r, dup, batch):
    q, J = _make(B, D, r, dup, batch)
    twin = dense_twin(q.loc, q.kernel_scale, q.image_scale, J)
    x = twin.sample((4,))
    assert q.kernel_dim_source == "exact" and float(q.kernel_dim) == D - r
    assert _rel(q.log_prob(x), twin.log_prob(x)) <= 1e-8
    assert _rel(q.entropy(), twin.entropy()) <= 1e-8
    assert q.log_prob(x).shape == (4, *batch) and q.entropy().shape == batch


class _GivenKernelDim(KernelImageNormalBase):
    """The shared base with nothing but the scales and ``R`` (as the prediction posterior)."""

    def __init__(self, loc, kernel_scale, image_scale, kernel_dim):
        self.loc, self.kernel_scale, self.image_scale = loc, kernel_scale, image_scale
        self._kernel_dim = torch.as_tensor(float(kernel_dim))
        super().__init__(loc.shape[:-1], loc.shape[-1:])

    @property
    def kernel_dim(self):
        return self._kernel_dim


@pytest.mark.float64_only
@pytest.mark.parametrize("batch", [(), (3,)])
def test_base_density_of_noise_and_entropy_match_dense_twin(batch):
    """``KernelImageNormalBase`` needs only ``R``: the density of ``loc + σ_k Pε + σ_i (ε − Pε)``
    from its noise parts, the entropy and the moments are the dense twin's."""
    B, D, r = 6, 20, 4
    J = jacobian_with_rank(B, D, r, cond=30.0)
    loc, sk, si = torch.randn(*batch, D), torch.rand(batch) + 0.5, torch.rand(batch) * 0.2 + 0.05
    q = _GivenKernelDim(loc, sk, si, D - r)
    twin = dense_twin(loc, sk, si, J)
    eps = torch.randn(4, *batch, D)
    k = eps @ dense_projector(J)
    x = loc + sk[..., None] * k + si[..., None] * (eps - k)
    assert _rel(q._log_density_of_noise(k, eps - k), twin.log_prob(x)) <= 1e-8
    assert _rel(q.entropy(), twin.entropy()) <= 1e-8 and q.entropy().shape == batch
    assert q.mean is loc and q.mode is loc


@pytest.mark.float64_only
@pytest.mark.parametrize("B, D, r, dup", CASES[:2])
def test_mean_and_variance_exact(B, D, r, dup):
    q, J = _make(B, D, r, dup, (2,))
    cov = dense_covariance(dense_projector(J), q.kernel_scale, q.image_scale)
    assert q.mean is q.loc and q.mode is q.loc
    assert _rel(q.variance, cov.diagonal(dim1=-2, dim2=-1)) <= 1e-8


def test_rsample_covariance_matches_within_sampling_error():
    D, n = 12, 20000
    q, J = _make(8, D, 5, 2)
    Sigma = dense_covariance(dense_projector(J), q.kernel_scale, q.image_scale)
    x = q.rsample((n,))
    assert x.shape == (n, D)
    # mean: std of a sample mean is sqrt(Σ_ii / n)
    assert bool(((x.mean(0) - q.loc).abs() <= 5 * (Sigma.diagonal() / n).sqrt()).all())
    # covariance (known mean): std of entry ij is sqrt((Σ_ii Σ_jj + Σ_ij²) / n); allow 5 of them
    xc = x - q.loc
    S = xc.T @ xc / n
    se = ((Sigma.diagonal()[:, None] * Sigma.diagonal()[None, :] + Sigma**2) / n).sqrt()
    assert bool(((S - Sigma).abs() <= 5 * se).all())


def test_rsample_is_reparameterised():
    J = jacobian_with_rank(3, 7, 3)
    loc = torch.randn(7, requires_grad=True)
    sk = torch.tensor(0.7, requires_grad=True)
    si = torch.tensor(0.2, requires_grad=True)
    q = KernelImageNormal(loc, sk, si, DenseProjector(J))
    assert q.has_rsample and q.support is constraints.real_vector
    torch.manual_seed(1)
    x = q.rsample((5,))
    g = torch.autograd.grad(x.sum(), (loc, sk, si))
    torch.manual_seed(1)
    eps = torch.randn(5, 7)
    P = dense_projector(J)
    torch.testing.assert_close(x, loc + sk * eps @ P + si * (eps - eps @ P))
    torch.testing.assert_close(g[0], torch.full((7,), 5.0))
    torch.testing.assert_close(g[1], (eps @ P).sum())
    assert torch.isfinite(g[2])


def test_sample_shapes_and_expand():
    q, J = _make(4, 9, 3, 1)
    assert q.batch_shape == () and q.event_shape == (9,)
    assert q.sample().shape == (9,) and q.rsample((2, 3)).shape == (2, 3, 9)
    e = q.expand((5,))
    assert e.batch_shape == (5,) and e.event_shape == (9,)
    assert e.projector is q.projector and e._stats is q._stats
    assert e.sample().shape == (5, 9) and e.rsample((2,)).shape == (2, 5, 9)
    x = torch.randn(2, 5, 9)
    torch.testing.assert_close(e.log_prob(x), q.log_prob(x))
    torch.testing.assert_close(e.entropy(), q.entropy().expand(5))
    assert e.variance.shape == (5, 9)
    ee = KernelImageNormal(torch.zeros(2, 1, 9), torch.ones(3), 0.5, q.projector)
    assert ee.batch_shape == (2, 3) and ee.sample((4,)).shape == (4, 2, 3, 9)


@pytest.mark.float64_only
def test_log_prob_entropy_gradients_match_dense_twin():
    J = jacobian_with_rank(5, 11, 3, duplicates=1)
    loc = torch.randn(11, requires_grad=True)
    sk = torch.tensor(0.8, requires_grad=True)
    si = torch.tensor(0.3, requires_grad=True)
    x = torch.randn(3, 11)
    for f in (lambda d: d.log_prob(x).sum(), lambda d: d.entropy()):
        q = KernelImageNormal(loc, sk, si, DenseProjector(J))
        got = torch.autograd.grad(f(q), (loc, sk, si), allow_unused=True)
        ref = torch.autograd.grad(f(dense_twin(loc, sk, si, J)), (loc, sk, si),
                                  allow_unused=True)
        for g, r in zip(got, ref):
            if r is None:
                assert g is None or float(g.abs().max()) == 0.0
            else:
                torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


# -- kernel dimension ----------------------------------------------------------------------------
def test_kernel_dimension_estimators_are_unbiased(record_property):
    """Linear model with D = 50 parameters and N = 10 data: ker J has dimension 40."""
    D, N, draws = 50, 10, 200
    J = linear_model_jacobian(N, D)
    loc = torch.zeros(D)
    exact = KernelImageNormal(loc, 1.0, 0.1, DenseProjector(J))
    assert float(exact.kernel_dim) == D - N and exact.kernel_dim_source == "exact"
    theory = {"hutchinson": 2 * (D - N), "image": 2 * N}  # chi-square variances
    for name in ("hutchinson", "image"):
        q = KernelImageNormal(loc, 1.0, 0.1, DenseProjector(J), rank_estimator=name)
        assert q.kernel_dim_source == name
        est = []
        for _ in range(draws):
            q.rsample()
            est.append(float(q.kernel_dim))
        est = torch.tensor(est)
        mean, var = float(est.mean()), float(est.var())
        se = math.sqrt(var / draws)
        print(f"\n{name}: mean {mean:.2f} (exact {D - N}), variance {var:.1f} "
              f"(theory {theory[name]}), 3 SE = {3 * se:.2f}")
        record_property(f"{name}_variance", var)
        assert abs(mean - (D - N)) <= 3 * se
        assert 0.5 * theory[name] <= var <= 1.6 * theory[name]


def test_kernel_dim_estimates_are_not_clipped():
    """Regression: clipping ⟨ε, Pε⟩ to [0, D] biased the estimate low when R is near D."""
    D = 6
    P = DenseProjector(jacobian_with_rank(2, D, 0))  # J = 0: P = I, R = D
    q = KernelImageNormal(torch.zeros(D), 1.0, 0.5, P, rank_estimator="hutchinson")
    q.transform_noise(torch.full((D,), 3.0))
    assert float(q.kernel_dim) == pytest.approx(9.0 * D)  # ‖ε‖² = 9D > D, unbiased, unclipped
    q = KernelImageNormal(torch.zeros(D), 1.0, 0.5, P, rank_estimator="image")
    q.transform_noise(torch.full((D,), 3.0))
    assert float(q.kernel_dim) == pytest.approx(D)


def test_kernel_dim_source_and_exact_needs_direct_solver():
    J = jacobian_with_rank(3, 8, 2)
    rtol = 1e-12 if J.dtype == torch.float64 else 1e-6  # CG's reachable floor per dtype
    mf = MatrixFreeProjector(lambda V: V @ J.T, lambda U: U @ J, (3, 8), rtol=rtol)
    assert KernelImageNormal(torch.zeros(8), 1.0, 0.5, mf).kernel_dim_source == "image"
    q = KernelImageNormal(torch.zeros(8), 1.0, 0.5, mf, rank_estimator="exact")
    assert q.kernel_dim_source == "exact"
    with pytest.raises(ValueError, match="direct solver"):
        _ = q.kernel_dim
    # With no draw recorded each distribution draws its own probe ε: kernel_diag = ε ⊙ Pε, whose
    # mean over probes is the dense diag P (variance P_ii + P_ii² ≤ 2 for Gaussian ε) and whose
    # sum, kernel_dim, averages to R = D − rank J = 6 (variance 2R = 12). n = 400 probes: the
    # bounds below are 5 standard errors (≤ 0.35 per coordinate, 0.87 for R).
    n = 400
    qs = [KernelImageNormal(torch.zeros(8), 1.0, 0.5, mf, rank_estimator="hutchinson")
          for _ in range(n)]
    diags = torch.stack([q.kernel_diag() for q in qs])
    dims = torch.stack([q.kernel_dim for q in qs])
    assert torch.isfinite(diags).all() and torch.isfinite(dims).all()
    Jd = J.double()  # rank 2 up to the default dtype's rounding: cut there, not at float64's eps
    P = torch.eye(8, dtype=torch.float64) - torch.linalg.pinv(Jd, rtol=1e-4) @ Jd
    assert (diags.double().mean(0) - P.diagonal()).abs().max() < 5 * math.sqrt(2 / n)
    assert abs(float(dims.double().mean()) - 6.0) < 5 * math.sqrt(12 / n)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    P = DenseProjector(jacobian_with_rank(3, 8, 2))
    loc = torch.zeros(8)
    with pytest.raises(ValueError, match=r"loc of shape \(\.\.\., 8\)"):
        KernelImageNormal(torch.zeros(7), 1.0, 0.5, P)
    with pytest.raises(ValueError, match=r"loc must be a tensor of shape \(\.\.\., D\)"):
        KernelImageNormal(torch.tensor(0.0), 1.0, 0.5, P)
    with pytest.raises(ValueError, match=r"scales must broadcast to loc.shape\[:-1\]"):
        KernelImageNormal(torch.zeros(2, 8), torch.ones(3), 0.5, P)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"kernel_scale must be positive \(σ > 0\)"):
            KernelImageNormal(loc, bad, 0.5, P)
        with pytest.raises(ValueError, match=r"image_scale must be positive \(σ > 0\)"):
            KernelImageNormal(loc, 1.0, torch.tensor([0.5, bad]), P)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="loc must be finite"):
            KernelImageNormal(torch.full((8,), bad), 1.0, 0.5, P)
        with pytest.raises(ValueError, match="J contains non-finite"):
            DenseProjector(torch.full((3, 8), bad))
    with pytest.raises(ValueError, match="projector must be a KernelProjector"):
        KernelImageNormal(loc, 1.0, 0.5, torch.eye(8))
    with pytest.raises(ValueError, match="rank_estimator must be one of"):
        KernelImageNormal(loc, 1.0, 0.5, P, rank_estimator="svd")
    with pytest.raises(ValueError):  # validated sample of the wrong event shape
        KernelImageNormal(loc, 1.0, 0.5, P).log_prob(torch.zeros(7))


@pytest.mark.float64_only
@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.integers(1, 3), max_size=2), sample=st.lists(st.integers(1, 3),
       max_size=2), D=st.integers(1, 8), r=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
def test_shapes_and_twin_property(batch, sample, D, r, seed):
    g = torch.Generator().manual_seed(seed)
    r = min(r, D)
    J = jacobian_with_rank(max(r, 1) + 1, D, r, generator=g)
    loc = torch.randn(*batch, D, generator=g)
    sk, si = torch.rand(batch, generator=g) + 0.5, torch.rand(batch, generator=g) + 0.1
    q = KernelImageNormal(loc, sk, si, DenseProjector(J))
    x = q.rsample(sample)
    assert x.shape == (*sample, *batch, D) and torch.isfinite(x).all()
    assert q.log_prob(x).shape == (*sample, *batch) and q.entropy().shape == tuple(batch)
    assert q.variance.shape == (*batch, D) and bool((q.variance > 0).all())
    assert float(q.kernel_dim) == D - r
    twin = dense_twin(q.loc, q.kernel_scale, q.image_scale, J)
    torch.testing.assert_close(q.log_prob(x), twin.log_prob(x), rtol=1e-8, atol=1e-8)
