"""TraceViking_ELBO: the KL term against dense closed forms, estimated kernel dimensions,
Monte Carlo KL terms for non-Gaussian priors, and gradients of a learned prior scale.

Losses compared "in expectation" use common random numbers: the same seed before each
evaluation gives the same draws (``gamma=0``: no carried state), so paired differences isolate
the term that differs. Tolerances are 3 standard errors of the paired differences.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from problems import linreg_data
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_value
from torch.distributions import MultivariateNormal, constraints, kl_divergence

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.infer.elbo import _kl_term


def regression_data(N, D, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    y = X @ torch.randn(D, generator=g) + 0.5 * torch.randn(N, generator=g)
    return X, y


def make_linreg(D, noise=0.5, prior_scale=None):
    """``theta ~ N(0, s² I_D)``, ``y ~ N(X theta, noise²)``; ``s`` is a ``pyro.param`` when
    ``prior_scale`` is None."""

    def model(X, y=None):
        s = prior_scale
        if s is None:
            s = pyro.param("prior_scale", torch.tensor(0.7), constraint=constraints.positive)
        theta = pyro.sample("theta", dist.Normal(0.0, s).expand([D]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal((X * theta).sum(-1), noise), obs=y)

    return model


def paired_losses(elbo, model, guide, args, num, seed0=1000, **guide_attrs):
    """``num`` loss evaluations, evaluation i seeded with ``seed0 + i``."""
    for name, value in guide_attrs.items():
        setattr(guide, name, value)
    out = []
    for i in range(num):
        pyro.set_rng_seed(seed0 + i)
        out.append(elbo.loss(model, guide, *args))
    return torch.tensor(out)


def test_beta_must_be_non_negative():
    with pytest.raises(ValueError, match="beta"):
        TraceViking_ELBO(beta=-0.1)


@pytest.mark.float64_only
def test_kl_term_is_dense_closed_form_times_beta():
    N, D, s = 5, 12, 1.3
    X, y = regression_data(N, D, seed=11)
    model = make_linreg(D, prior_scale=s)
    guide = AutoViking(model, gamma=0.0, init_image_scale=0.2,
                       init_loc_fn=init_to_value(values={"theta": 0.3 * torch.ones(D)}))
    guide(X, y)
    losses = {}
    for beta in (0.0, 0.5, 1.0):
        pyro.set_rng_seed(7)
        losses[beta] = TraceViking_ELBO(beta=beta).loss(model, guide, X, y)
    J = guide.last_projector.operator.to_dense()
    P = torch.eye(D) - torch.linalg.pinv(J) @ J
    cov = s**2 * P + guide.image_scale.item() ** 2 * (torch.eye(D) - P)  # σ_ker tied to s
    kl = kl_divergence(MultivariateNormal(guide.loc.detach(), cov),
                       MultivariateNormal(torch.zeros(D), s**2 * torch.eye(D))).item()
    assert losses[1.0] - losses[0.0] == pytest.approx(kl, rel=1e-9)
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * kl, rel=1e-9)


@pytest.mark.parametrize("estimator", ["hutchinson", "image"])
def test_estimated_kernel_dimension_is_unbiased_in_elbo(estimator):
    """D = 60, N = 10: R = dim ker = 50. Hutchinson ⟨ε, Pε⟩ has variance 2R = 100, the image
    estimator D − ⟨ε, ε − Pε⟩ has 2(D − R) = 20; both enter the KL linearly, so the ELBO with
    an estimate agrees in expectation with the ELBO with the exact R."""
    N, D, M = 10, 60, 100
    X, y = regression_data(N, D, seed=12)
    model = make_linreg(D, prior_scale=1.0)
    # γ = 0 with image_noise="carried": every draw is (Pη, η − Pη) whatever the estimator, so
    # the runs pair (with "fresh" the exact rank takes the Gram-factorisation draw instead).
    guide = AutoViking(model, gamma=0.0, init_image_scale=0.1, image_noise="carried")
    guide(X, y)
    assert guide.last_projector.kernel_dim == D - N
    elbo = TraceViking_ELBO(num_particles=1)
    exact = paired_losses(elbo, model, guide, (X, y), M, rank_estimator="exact")
    est = paired_losses(elbo, model, guide, (X, y), M, rank_estimator=estimator)
    diff = est - exact  # the likelihood draws cancel: only the KL's R differs
    se = diff.std().item() / math.sqrt(M)
    # KL = ½ (D − R) c + const with c = σ_im² − 1 − log σ_im² (s = σ_ker = 1), so
    # Var(R̂) = Var(diff) / (c/2)².
    si2 = guide.image_scale.item() ** 2
    c = si2 - 1 - math.log(si2)
    var_R = diff.var().item() / (c / 2) ** 2
    print(f"{estimator}: loss variance {est.var().item():.1f} (exact R: {exact.var().item():.1f}); "
          f"mean difference {diff.mean().item():.3f} ± {se:.3f}; Var(R̂) = {var_R:.1f}")
    assert abs(diff.mean().item()) < 3 * se
    expected_var = 2 * (D - N) if estimator == "hutchinson" else 2 * N
    # A variance estimated from 100 χ²-type draws has relative s.d. ≈ 0.15–0.18: factor 2.
    assert expected_var / 2 < var_R < expected_var * 2, var_R


def test_constrained_latents_monte_carlo_kl_matches_trace_elbo():
    """LogNormal and HalfNormal latents get a Monte Carlo KL term (in unconstrained space, with
    the log-Jacobian the guide's Delta carries): in expectation the loss is Pyro's Trace_ELBO."""
    N, D, M = 8, 3, 100
    X, y = regression_data(N, D, seed=13)

    def model(X, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", N):
            return pyro.sample("y", dist.StudentT(3.0, (X * w).sum(-1) * tau, sigma), obs=y)

    guide = AutoViking(model, gamma=0.0)
    guide(X, y)
    viking = paired_losses(TraceViking_ELBO(), model, guide, (X, y), M)
    trace = paired_losses(Trace_ELBO(), model, guide, (X, y), M)
    assert torch.isfinite(viking).all() and torch.isfinite(trace).all()
    diff = viking - trace
    se = diff.std().item() / math.sqrt(M)
    print(f"TraceViking {viking.mean().item():.3f}, Trace_ELBO {trace.mean().item():.3f}, "
          f"paired difference {diff.mean().item():.3f} ± {se:.3f}")
    assert abs(diff.mean().item()) < 3 * se


@pytest.mark.float64_only
def test_learned_prior_scale_gets_the_kl_gradient():
    """``s`` is a ``pyro.param`` and σ_ker is tied to it. The kernel is ker X exactly, so the
    likelihood does not depend on s and ∂loss/∂s is the KL's:
    ∂/∂s ½[(D − R)(σ_im²/s² − 1 − log(σ_im²/s²)) + ‖m‖²/s²]."""
    N, D = 3, 6
    X, y = regression_data(N, D, seed=14)
    model = make_linreg(D, prior_scale=None)
    loc0 = 0.5 * torch.linalg.pinv(X) @ y  # residuals ≠ 0, so rank J = N
    guide = AutoViking(model, init_loc_fn=init_to_value(values={"theta": loc0}),
                       init_image_scale=0.3)
    guide(X, y)
    assert guide.kernel_scale_source == "prior"
    loss = TraceViking_ELBO(num_particles=3).differentiable_loss(model, guide, X, y)
    s_unconstrained = pyro.get_param_store().get_param("prior_scale").unconstrained()
    (grad,) = torch.autograd.grad(loss, s_unconstrained)
    s = pyro.param("prior_scale").item()
    si2, m2, R = guide.image_scale.item() ** 2, guide.loc.detach().pow(2).sum().item(), D - N
    dkl_ds = 0.5 * ((D - R) * (-2 * si2 / s**3 + 2 / s) - 2 * m2 / s**3)
    assert grad.item() == pytest.approx(s * dkl_ds, rel=1e-8)  # d/d log s = s d/ds
    assert guide.kernel_scale.item() == pytest.approx(s)


def _viking_setup(prior, D=6, N=9, vectorize=False, K=1):
    X, y = regression_data(N, D, seed=4)

    def model(X, y=None):
        theta = pyro.sample("theta", prior)
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))  # a Monte Carlo KL site
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal((X * theta).sum(-1), tau), obs=y)

    guide = AutoViking(model, gamma=0.0, init_image_scale=0.2, kernel_scale="learned",
                       init_loc_fn=init_to_value(values={"theta": 0.3 * torch.ones(D),
                                                         "tau": torch.tensor(0.8)}))
    elbo = TraceViking_ELBO(num_particles=K, vectorize_particles=vectorize,
                            max_plate_nesting=1)
    return model, guide, elbo, (X, y)


@pytest.mark.parametrize("vectorize, K", [(False, 1), (True, 3)])
def test_skipped_log_densities_and_isotropic_kl_change_nothing(vectorize, K):
    """The ELBO skips the log-densities that its closed-form KL replaces, and reads a scalar prior
    scale without building D-sized prior vectors. Both shortcuts must leave the loss and its
    gradients exactly as the full computation (``get_importance_trace`` + the general KL of a
    non-expanded prior with the same values), with the same random numbers."""
    from pyro.infer.enum import get_importance_trace

    D = 6
    iso = dist.Normal(torch.zeros(()), 0.9).expand([D]).to_event(1)  # stride-0: fast path
    full = dist.Normal(torch.zeros(D), 0.9 * torch.ones(D)).to_event(1)  # general path
    results = []
    for prior, fast in ((iso, True), (full, False)):
        pyro.clear_param_store()
        model, guide, elbo, args = _viking_setup(prior, D, vectorize=vectorize, K=K)
        guide(*args)
        pyro.set_rng_seed(3)
        if fast:
            traces = list(elbo._get_traces(model, guide, args, {}))
            # Marked sites carry a zero log-density that Pyro's memoised compute_log_prob and
            # compute_score_parts keep (the closed-form KL replaces them).
            skipped = [n for n, s in traces[0][0].nodes.items() if s["type"] == "sample"
                       and not s["log_prob"].requires_grad and not s["log_prob"].any()]
            assert skipped == ["theta"]  # tau keeps its densities (Monte Carlo KL)
            assert not traces[0][1].nodes["theta"]["log_prob"].any()
        else:
            def full_trace(m, g, a, k, elbo=elbo):
                return get_importance_trace("flat", elbo.max_plate_nesting, m, g, a, k)

            elbo._get_trace = full_trace  # instance attribute: this ELBO only
            traces = list(elbo._get_traces(model, guide, args, {}))
        if fast:
            loss = sum(elbo._differentiable_loss_particle(mt, gt)[1] for mt, gt in traces)
        else:  # by hand: every density except those the KL replaces, plus the general KL
            covered = ("theta", "_AutoViking_latent")
            loss = 0.0
            for mt, gt in traces:
                lp = sum(st["log_prob_sum"] for n, st in mt.nodes.items()
                         if st["type"] == "sample" and n not in covered)
                lq = sum(st["log_prob_sum"] for n, st in gt.nodes.items()
                         if st["type"] == "sample" and n not in covered)
                q = gt.nodes["_AutoViking_latent"]["fn"]
                loss = loss - (lp - lq) + _kl_term(q, mt, gt, 1.0)
        params = [guide.loc, guide.image_scale_unconstrained,
                  guide.kernel_scale_unconstrained_unconstrained]
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_distinct_learnable_prior_scales_keep_their_own_gradients():
    """Two ``pyro.param`` prior scales with equal values are not one isotropic scale: each must
    get its own KL gradient (the isotropic shortcut would send it all to the first). Reference:
    the same priors written with full-size scale tensors (the general closed form)."""
    X, y = regression_data(7, 5, seed=2)
    grads = []
    for full in (False, True):
        pyro.clear_param_store()

        def model(X, y=None, full=full):
            a = pyro.param("a", torch.tensor(0.5), constraint=constraints.positive)
            b = pyro.param("b", torch.tensor(0.5), constraint=constraints.positive)
            sa = a * torch.ones(3) if full else a
            sb = b * torch.ones(2) if full else b
            w1 = pyro.sample("w1", dist.Normal(0.0, sa).expand([3]).to_event(1))
            w2 = pyro.sample("w2", dist.Normal(0.0, sb).expand([2]).to_event(1))
            with pyro.plate("data", X.shape[0]):
                mean = X[:, :3] @ w1 + X[:, 3:] @ w2
                return pyro.sample("y", dist.Normal(mean, 0.5), obs=y)

        guide = AutoViking(model, gamma=0.0, kernel_scale="learned",
                           init_loc_fn=init_to_value(values={"w1": 0.2 * torch.ones(3),
                                                             "w2": -0.1 * torch.ones(2)}))
        guide(X, y)
        pyro.set_rng_seed(5)
        loss = TraceViking_ELBO().differentiable_loss(model, guide, X, y)
        store = pyro.get_param_store()
        params = [store.get_param("a").unconstrained(), store.get_param("b").unconstrained()]
        grads.append(torch.autograd.grad(loss, params))
    for g_fast, g_ref in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads[0][0], grads[0][1])  # the two scales differ in gradient


def test_kernel_scale_ties_only_to_one_shared_prior_scale():
    """``kernel_scale="prior"`` needs one prior scale: two learnable scales that merely start
    equal are refused (``"auto"`` then learns σ_ker); one shared ``pyro.param`` is tied."""
    X, y = regression_data(6, 5, seed=3)

    def model(X, y=None, shared=True):
        a = pyro.param("a", torch.tensor(0.5), constraint=constraints.positive)
        b = a if shared else pyro.param("b", torch.tensor(0.5), constraint=constraints.positive)
        w1 = pyro.sample("w1", dist.Normal(0.0, a).expand([3]).to_event(1))
        w2 = pyro.sample("w2", dist.Normal(0.0, b).expand([2]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(X[:, :3] @ w1 + X[:, 3:] @ w2, 0.5), obs=y)

    pyro.clear_param_store()
    guide = AutoViking(model, kernel_scale="prior")
    guide(X, y, shared=True)
    assert guide.kernel_scale_source == "prior"
    with pytest.raises(ValueError, match="one common scale"):
        AutoViking(model, kernel_scale="prior")(X, y, shared=False)
    guide = AutoViking(model)
    guide(X, y, shared=False)
    assert guide.kernel_scale_source == "learned"


def test_vectorized_particles_count_the_kl_of_a_plated_latent_once(dtype):
    """A latent inside ``pyro.plate("data", 3)``: the vectorised estimate of the loss agrees with
    the sequential one (the KL is counted once, not once per particle)."""
    x, y = linreg_data(3, 2)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal((x * w).sum(-1) + b, 0.5), obs=y)

    guide = AutoViking(model)
    guide(x, y)
    losses = []
    for vectorize in (True, False):
        pyro.set_rng_seed(1)
        elbo = TraceViking_ELBO(num_particles=400, vectorize_particles=vectorize,
                                max_plate_nesting=1)
        losses.append(elbo.loss(model, guide, x, y))
    # per-particle s.d. of the likelihood term ≈ 5: s.e. of a mean of 400 ≈ 0.25
    assert abs(losses[0] - losses[1]) < 1.5, losses
