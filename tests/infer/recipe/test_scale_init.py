"""Scale initialisation from curvature (pyro_viking.infer.recipe.scale_init) against brute force."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.optimize import minimize
from torch.distributions import MultivariateNormal, constraints, kl_divergence

from pyro_viking.infer.recipe.scale_init import (
    CurvatureStatistics,
    curvature_statistics,
    optimal_scales,
    scale_objective,
)

NOISE = 0.5


def linear_gaussian(N=40, D=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=dtype)
    theta = 0.7 * torch.randn(D, generator=g, dtype=dtype)
    y = X @ theta + NOISE * torch.randn(N, generator=g, dtype=dtype)
    return X, y


def make_model(X, y, learned_prior: bool, fixed_scale=0.8):
    N, D = X.shape

    def model(idx=None):
        if learned_prior:
            s = pyro.param("prior_scale", lambda: torch.tensor(1.0, dtype=X.dtype),
                           constraint=constraints.positive)
        else:
            s = torch.tensor(fixed_scale, dtype=X.dtype)
        theta = pyro.sample("theta", dist.Normal(torch.zeros((), dtype=X.dtype), s)
                            .expand([D]).to_event(1))
        with pyro.plate("data", N, subsample=idx) as i:
            pyro.sample("obs", dist.Normal(X[i] @ theta, NOISE), obs=y[i])

    return model


def ridge(X, y, alpha=1.0):
    D = X.shape[1]
    return torch.linalg.solve(X.T @ X / NOISE**2 + alpha * torch.eye(D, dtype=X.dtype),
                              X.T @ y / NOISE**2)


def dense_elbo_loss(X, y, theta_hat, batches):
    """The exact negative (β-tempered) ELBO of the VIKING family as a function
    ``(beta, sigma_im, sigma_ker, prior_scale) -> float``, averaged over the batches."""
    X, y, theta_hat = X.double(), y.double(), theta_hat.double()
    N, D = X.shape
    eye = torch.eye(D, dtype=torch.float64)
    parts = []
    for idx in batches:
        Xb, yb = X[idx], y[idx]
        res = yb - Xb @ theta_hat
        J = Xb * (res / NOISE**2)[:, None]  # per-datum gradients of log p
        image = J.T @ torch.linalg.pinv(J @ J.T) @ J
        parts.append((Xb, res, image, N / len(idx)))

    def loss(beta, sigma_im, sigma_ker, prior_scale):
        total = 0.0
        for Xb, res, image, w in parts:
            cov = sigma_ker**2 * (eye - image) + sigma_im**2 * image
            quad = res.pow(2) + torch.einsum("bi,ij,bj->b", Xb, cov, Xb)
            lik = w * (0.5 * len(res) * math.log(2 * math.pi * NOISE**2)
                       + quad.sum() / (2 * NOISE**2))
            q = MultivariateNormal(theta_hat, cov)
            p = MultivariateNormal(torch.zeros(D, dtype=torch.float64), prior_scale**2 * eye)
            total += float(lik + beta * kl_divergence(q, p))
        return total / len(parts)

    return loss


def brute_force(objective, x0):
    res = minimize(lambda x: objective(*np.exp(x)), np.log(x0), method="Nelder-Mead",
                   options=dict(xatol=1e-9, fatol=1e-12, maxiter=4000))
    return np.exp(res.x)


# -- the closed-form solve against numerical minimisation of F -----------------------------------
@pytest.mark.parametrize("K", [0.0, 50.0])
@pytest.mark.parametrize("beta", [1.0, 0.03])
def test_optimal_scales_minimise_objective(K, beta):
    stats = CurvatureStatistics(image_trace=400.0, kernel_trace=K, image_dim=20.0,
                                latent_dim=300, sq_distance=30.0)
    tied = optimal_scales(stats, beta, kernel="prior")
    x = brute_force(lambda si, s: scale_objective(stats, beta, si, s, s**-2), [0.1, 0.3])
    np.testing.assert_allclose([tied["image_scale"], tied["prior_scale"]], x, rtol=1e-5)
    assert tied["kernel_scale"] == pytest.approx(tied["prior_scale"])

    free = optimal_scales(stats, beta, kernel="learned")
    x = brute_force(lambda si, sk, s: scale_objective(stats, beta, si, sk, s**-2),
                    [0.1, 0.3, 0.3])
    np.testing.assert_allclose([free["image_scale"], free["kernel_scale"], free["prior_scale"]],
                               x, rtol=1e-5)

    fixed = optimal_scales(stats, beta, prior_scale=0.5, kernel="learned")
    x = brute_force(lambda si, sk: scale_objective(stats, beta, si, sk, 4.0), [0.1, 0.3])
    np.testing.assert_allclose([fixed["image_scale"], fixed["kernel_scale"]], x, rtol=1e-5)
    assert fixed["prior_scale"] == pytest.approx(0.5)


# -- the whole estimate against brute force on the exact linear-Gaussian problem ----------------
@pytest.mark.parametrize("dtype, beta, num_batches", [
    (torch.float64, 1.0, 1), (torch.float64, 0.1, 4), (torch.float32, 0.1, 1),
    (torch.float32, 1.0, 4)])
def test_linear_gaussian_brute_force(dtype, beta, num_batches):
    """σ_im and the (learned, tied) prior scale match a numerical minimisation of the exact
    ELBO in the two scales within 5 %, with and without minibatches (N/B plate scaling)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    X, y = linear_gaussian(dtype=dtype)
    N = X.shape[0]
    batches = list(torch.arange(N).chunk(num_batches))
    theta_hat = ridge(X.double(), y.double()).to(dtype)
    model = make_model(X, y, learned_prior=True)
    stats = curvature_statistics(model, {"theta": theta_hat}, batches=[{"idx": b} for b in batches],
                                 num_label_samples=32)
    assert stats.kernel_trace == pytest.approx(0.0, abs=1e-3 * stats.image_trace)
    assert stats.image_dim == pytest.approx(N / num_batches)
    got = optimal_scales(stats, beta, kernel="prior")

    loss = dense_elbo_loss(X, y, theta_hat, batches)
    x = brute_force(lambda si, s: loss(beta, si, s, s), [0.1, 0.5])
    np.testing.assert_allclose([got["image_scale"], got["prior_scale"]], x, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_gaussian_fixed_prior(dtype):
    """With the prior scale fixed, only σ_im is optimised (σ_ker tied to the prior)."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    X, y = linear_gaussian(dtype=dtype, seed=1)
    N = X.shape[0]
    batches = list(torch.arange(N).chunk(2))
    theta_hat = ridge(X.double(), y.double()).to(dtype)
    model = make_model(X, y, learned_prior=False, fixed_scale=0.8)
    stats = curvature_statistics(model, {"theta": theta_hat}, batches=[{"idx": b} for b in batches],
                                 num_label_samples=32)
    got = optimal_scales(stats, 0.3, prior_scale=0.8)
    loss = dense_elbo_loss(X, y, theta_hat, batches)
    x = brute_force(lambda si: loss(0.3, si, 0.8, 0.8), [0.1])
    assert got["image_scale"] == pytest.approx(float(x[0]), rel=0.05)


def test_curvature_statistics_without_vmap_under_no_grad(monkeypatch, default_dtype):
    """Model code that ``torch.func`` cannot vmap gives the same statistics, through one reverse
    pass per row (which also works under a caller's ``torch.no_grad()``); the Jacobian routes
    themselves: ``tests/linalg/test_per_example.py``."""
    X, y = linear_gaussian(N=6, D=10, dtype=default_dtype)
    model = make_model(X, y, learned_prior=False)
    loc = {"theta": ridge(X.double(), y.double()).to(default_dtype)}
    kw = dict(batches=[{}], num_label_samples=3, num_kernel_samples=2)
    torch.manual_seed(2)
    want = curvature_statistics(model, loc, **kw)

    def no_vmap(*args, **kwargs):
        raise RuntimeError("model code without a functorch rule")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    torch.manual_seed(2)
    with torch.no_grad():
        got = curvature_statistics(model, loc, **kw)
    assert got.image_dim == want.image_dim
    assert got.image_trace == pytest.approx(want.image_trace, rel=1e-6)
    assert got.kernel_trace == pytest.approx(want.kernel_trace, abs=1e-6 * want.image_trace)
    rounding = 100 * torch.finfo(default_dtype).eps * X.shape[0]  # vmapped vs looped rows
    assert got.kernel_curve == pytest.approx(want.kernel_curve, abs=rounding)


@pytest.mark.float64_only
def test_curvature_statistics_through_the_layer_gram_match_the_dense_route(monkeypatch):
    """A network's statistics come from the layer Gram (the guide's backend: ``G``, the
    cross-Gram ``J J̃ᵀ`` and ``‖g̃_i‖²`` from the layers' pieces) and equal those of dense
    per-example Jacobians under one seed."""
    from pyro_viking import BayesianNetwork
    from pyro_viking.infer.recipe import scale_init
    from pyro_viking.linalg.per_example import PerExampleJacobian

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x, y = torch.randn(30, 3), torch.randint(0, 4, (30,))
    bnn = BayesianNetwork(net, "classification", prior_scale=1.0, batch_size=10)
    loc = {bnn.site_name(n): p.detach() for n, p in net.named_parameters()}
    built = []
    real = scale_init.batch_jacobian

    def spy(rows, z):
        jac = real(rows, z)
        built.append(type(jac).__name__)
        return jac

    monkeypatch.setattr(scale_init, "batch_jacobian", spy)
    kw = dict(num_batches=3, num_label_samples=2, num_kernel_samples=2)
    pyro.set_rng_seed(3)
    got = curvature_statistics(bnn, loc, x, y, **kw)
    assert set(built) == {"LayerGramJacobian"}
    monkeypatch.setattr(scale_init, "batch_jacobian", lambda rows, z: PerExampleJacobian(rows, z))
    pyro.set_rng_seed(3)
    want = curvature_statistics(bnn, loc, x, y, **kw)
    assert got.image_dim == want.image_dim == 10
    assert got.image_trace == pytest.approx(want.image_trace, rel=1e-10)
    assert got.kernel_trace == pytest.approx(want.kernel_trace, rel=1e-10)
    assert got.kernel_curve == pytest.approx(want.kernel_curve, rel=1e-8, abs=1e-12)
