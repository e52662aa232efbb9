"""Closed-form KL(KernelImageNormal ‖ diagonal Normal prior), tested twice: against the dense
twin and against Monte Carlo; unbiasedness with estimated kernel dimensions; fallbacks."""

import math

import pyro.distributions as dist
import pytest
import torch
from problems import block_scale, dense_twin, jacobian_with_rank
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from pyro_viking.distributions import KernelImageNormal, kl_kernel_image_normal_diag
from pyro_viking.linalg import DenseProjector

CASES = [(6, 20, 4, 2), (30, 120, 20, 6), (60, 200, 45, 10)]  # B, D, rank r < B, duplicated rows


def _priors(D, batch=()):
    """name -> (prior, dense MultivariateNormal twin of the prior)."""
    mu = torch.randn(*batch, D)
    s_block = block_scale(D, [0.5, 2.0, 1.3]).expand(*batch, D)
    iso = dist.Normal(torch.zeros(()), 1.7).expand([D]).to_event(1)
    return {
        "isotropic": (iso, MultivariateNormal(torch.zeros(D), 1.7**2 * torch.eye(D))),
        "block": (dist.Normal(mu, s_block).to_event(1),
                  MultivariateNormal(mu, torch.diag_embed(s_block**2))),
        "plain_normal": (Normal(mu, s_block),
                         MultivariateNormal(mu, torch.diag_embed(s_block**2))),
    }


def _q(B, D, r, dup, batch=(), **kw):
    J = jacobian_with_rank(B, D, r, cond=30.0, duplicates=dup)
    q = KernelImageNormal(torch.randn(*batch, D), torch.rand(batch) + 0.5,
                          torch.rand(batch) * 0.2 + 0.05, DenseProjector(J), **kw)
    return q, J


@pytest.mark.float64_only
@pytest.mark.parametrize("B, D, r, dup", CASES)
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("prior_name", ["isotropic", "block", "plain_normal"])
def test_kl_matches_dense_twin(B, D, r, dup, batch, prior_name):
    q, J = _q(B, D, r, dup, batch)
    prior, prior_twin = _priors(D, batch)[prior_name]
    kl = kl_divergence(q, prior)
    ref = kl_divergence(dense_twin(q.loc, q.kernel_scale, q.image_scale, J), prior_twin)
    assert kl.shape == batch
    assert float(((kl - ref).abs() / ref.abs()).max()) <= 1e-8


def test_kl_matches_monte_carlo():
    q, _ = _q(8, 15, 5, 2)
    n = 20000
    for prior, _ in _priors(15).values():
        x = q.sample((n,))
        log_ratio = q.log_prob(x) - prior.log_prob(x).reshape(n, -1).sum(-1)
        se = float(log_ratio.std()) / math.sqrt(n)
        assert abs(float(log_ratio.mean()) - float(kl_divergence(q, prior))) <= 4 * se


@pytest.mark.float64_only
def test_kl_reduces_to_paper_formula():
    """σ_ker = s, prior N(0, s² I): KL = ½[(D − R)(σ_i²/s² − 1 − log(σ_i²/s²)) + ‖m‖²/s²]."""
    D, r, s, si = 30, 8, 0.7, 0.05
    loc = torch.randn(D)
    q = KernelImageNormal(loc, s, si, DenseProjector(jacobian_with_rank(10, D, r)))
    t = si**2 / s**2
    paper = 0.5 * ((D - (D - r)) * (t - 1 - math.log(t)) + float(loc @ loc) / s**2)
    kl = kl_divergence(q, dist.Normal(0.0, s).expand([D]).to_event(1))
    assert float(kl) == pytest.approx(paper, rel=1e-10)


def test_unsupported_priors_raise_not_implemented():
    q, _ = _q(4, 9, 3, 1)
    unsupported = [
        dist.Laplace(torch.zeros(9), 1.0).to_event(1),
        MultivariateNormal(torch.zeros(9), 0.5 * torch.eye(9) + 0.5),
        dist.Normal(torch.zeros(3, 3), 1.0).to_event(2),  # same numel, wrong event shape
        dist.Normal(torch.zeros(7), 1.0).to_event(1),
        Normal(torch.zeros(7), 1.0),
    ]
    for prior in unsupported:
        with pytest.raises(NotImplementedError):
            kl_divergence(q, prior)


@pytest.mark.parametrize("estimator", ["hutchinson", "image"])
def test_kl_with_estimated_kernel_dim_is_unbiased(estimator, record_property):
    D, draws = 40, 200
    J = jacobian_with_rank(12, D, 10, duplicates=2)
    exact_q = KernelImageNormal(torch.randn(D), 1.2, 0.3, DenseProjector(J))
    q = KernelImageNormal(exact_q.loc, 1.2, 0.3, DenseProjector(J), rank_estimator=estimator)
    for name, (prior, _) in _priors(D).items():
        exact = float(kl_divergence(exact_q, prior))
        kls = []
        for _ in range(draws):
            q.rsample()
            kls.append(float(kl_divergence(q, prior)))
        kls = torch.tensor(kls)
        se = float(kls.std()) / math.sqrt(draws)
        print(f"\nKL[{estimator}, {name}]: mean {float(kls.mean()):.3f} exact {exact:.3f} "
              f"variance {float(kls.var()):.3g}")
        record_property(f"kl_{estimator}_{name}_variance", float(kls.var()))
        assert se > 0 and abs(float(kls.mean()) - exact) <= 3 * se


@pytest.mark.float64_only
@pytest.mark.parametrize("prior_name", ["isotropic", "block"])
def test_kl_gradients_match_dense_twin(prior_name):
    D = 12
    J = jacobian_with_rank(6, D, 4, duplicates=1)
    loc = torch.randn(D, requires_grad=True)
    sk = torch.tensor(0.9, requires_grad=True)
    si = torch.tensor(0.2, requires_grad=True)
    ps = torch.tensor(1.3, requires_grad=True)  # prior scale multiplier
    params = (loc, sk, si, ps)

    def kls():
        prior, twin = _priors(D)[prior_name]
        p = dist.Normal(prior.base_dist.loc, prior.base_dist.scale * ps).to_event(1)
        p_twin = MultivariateNormal(twin.loc, twin.covariance_matrix * ps**2)
        q = KernelImageNormal(loc, sk, si, DenseProjector(J))
        return kl_divergence(q, p), kl_divergence(dense_twin(loc, sk, si, J), p_twin)

    torch.manual_seed(3)
    got = torch.autograd.grad(kls()[0], params)
    torch.manual_seed(3)
    ref = torch.autograd.grad(kls()[1], params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.float64_only
def test_functional_form_broadcasts_prior():
    q, J = _q(5, 10, 3, 1, (2,))
    kl = kl_kernel_image_normal_diag(q, torch.zeros(()), torch.full((1,), 0.8))
    ref = kl_divergence(dense_twin(q.loc, q.kernel_scale, q.image_scale, J),
                        MultivariateNormal(torch.zeros(10), 0.64 * torch.eye(10)))
    torch.testing.assert_close(kl, ref, rtol=1e-9, atol=0)
