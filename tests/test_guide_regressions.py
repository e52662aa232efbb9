"""Regression tests of the guide-level failures of issue #11 (numbered as there) and #12 point 4.

Each runs in float32 (the user's default dtype) and, where the numbers allow, float64: the
``dtype`` fixture below sets the default dtype for one test and restores it.
"""

import io
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroModule, PyroParam, PyroSample
from pyro.optim import Adam, ClippedAdam
from torch import nn
from torch.distributions import constraints
from torch.func import jacrev

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.model_trace.rows import make_rows_fn


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


@pytest.fixture
def float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield torch.float32
    torch.set_default_dtype(old)


def linreg(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def noisy_linreg(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


def logreg(x, y=None):
    """Subsampled data plate (batches of 16), its size read from the data."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(x[idx] * w).sum(-1)),
                    obs=None if y is None else y[idx])


def regression_data(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(N, generator=g,
                                                                                 dtype=torch.float64)
    return x.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())


# -- 2: vectorised particles count the KL once ----------------------------------------------------
def test_2_vectorized_particles_count_the_kl_once(dtype):
    """A latent inside ``pyro.plate("data", 3)``: the vectorised estimate of the loss agrees with
    the sequential one (before the fix: 1090 vs 10.8, the KL counted once per particle)."""
    x, y = regression_data(3, 2)

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


# -- 4: models without observed sites --------------------------------------------------------------
def test_4_model_without_observations_is_the_prior_family(dtype):
    """No likelihood: the kernel is the whole space, ``q = N(loc, σ_ker² I)``; a warning, not an
    error; Pyro's ELBOs and Predictive work."""
    def model():
        pyro.sample("a", dist.Normal(0.0, 2.0).expand([3]).to_event(1))

    guide = AutoViking(model, kernel_scale="learned", init_kernel_scale=0.5)
    with pytest.warns(UserWarning, match="no observed sites"):
        guide()
    assert guide.last_projector.kernel_dim == 3
    for Elbo in (TraceViking_ELBO, Trace_ELBO):
        assert math.isfinite(Elbo().loss(model, guide))
    SVI(model, guide, Adam({"lr": 0.01}), TraceViking_ELBO()).step()
    a = Predictive(model, guide=guide, num_samples=400)()["a"]
    sd = a.reshape(400, 3).std(0)
    assert torch.allclose(sd, guide.kernel_scale.expand(3), rtol=0.15), sd  # s.e. 3.5 %


# -- 6: the data-set size is read at every call ----------------------------------------------------
def test_6_subsample_plate_follows_the_current_data_size(dtype):
    guide = AutoViking(logreg)
    for N in (64, 100, 40):
        x, y = torch.randn(N, 3), torch.randint(0, 2, (N,)).to(torch.get_default_dtype())
        seen = torch.cat([poutine.trace(guide).get_trace(x, y).nodes["data"]["value"]
                          for _ in range(20)])
        assert seen.max() < N and seen.max() >= 0.8 * N, (N, seen.max())
        assert math.isfinite(TraceViking_ELBO().loss(logreg, guide, x, y))


# -- 7: Predictive right after SVI is the exact posterior ------------------------------------------
N_EX, D_EX, NOISE = 5, 12, 0.5


def exact_problem():
    """Orthogonal rows of norm 2: the posterior ``N(m, s² P + v (I − P))`` is in the family."""
    g = torch.Generator().manual_seed(20252)
    Q, _ = torch.linalg.qr(torch.randn(D_EX, N_EX, generator=g, dtype=torch.float64))
    X = 2.0 * Q.T
    y = X @ torch.randn(D_EX, generator=g, dtype=torch.float64) \
        + NOISE * torch.randn(N_EX, generator=g, dtype=torch.float64)
    cov = torch.linalg.inv(X.T @ X / NOISE**2 + torch.eye(D_EX, dtype=torch.float64))
    return X, y, cov


def exact_model(X, y=None):
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0).expand([D_EX]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal((X * theta).sum(-1), NOISE), obs=y)


def test_7_predictive_after_svi_has_the_exact_covariance(dtype):
    """No manual ``project_training_data``: the first prediction after training projects on the
    training data (every step had the same data), so the sample covariance of the predictive
    draws matches the exact posterior covariance within Monte Carlo error (before the fix: the
    last training step's kernel sample repeated, 11× the Monte Carlo error)."""
    X64, y64, cov = exact_problem()
    X, y = X64.to(dtype), y64.to(dtype)
    mle = torch.linalg.pinv(X) @ y
    guide = AutoViking(exact_model, init_loc_fn=init_to_value(values={"theta": mle}),
                       grad_through_projection=False)
    elbo = TraceViking_ELBO(num_particles=32, vectorize_particles=True)
    svi = SVI(exact_model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.98}), elbo)
    for _ in range(150):
        svi.step(X, y)
    X_test = torch.randn(7, D_EX, generator=torch.Generator().manual_seed(3)).to(dtype)
    # Predictive (sequential): S ≤ the 100 samples the guide projects (more cycle through
    # them, as explicit caches do); a vectorised prediction call of the guide asks for S draws
    # at once (as Predictive(parallel=True) does) and gets S projected samples.
    for S, parallel in ((100, False), (1000, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about
            if parallel:
                with torch.no_grad(), poutine.mask(mask=False), pyro.plate("s", S, dim=-2):
                    theta = guide(X_test)["theta"]
            else:
                theta = Predictive(exact_model, guide=guide, num_samples=S)(X_test)["theta"]
        theta = theta.reshape(S, D_EX).double()
        for A in (torch.eye(D_EX, dtype=torch.float64), X_test.double()):  # θ and X_test θ
            C_exact = A @ cov @ A.T
            err = (torch.cov((theta @ A.T).T) - C_exact).norm()
            # E‖Ĉ − C‖_F² ≈ (‖C‖_F² + (tr C)²) / S for Gaussian draws
            mc = ((C_exact.norm() ** 2 + C_exact.trace() ** 2) / S).sqrt()
            print(f"{dtype} S={S}: covariance error / Monte Carlo error = {err / mc:.2f}")
            assert err < 2.0 * mc, (err, mc)


def test_7_lazy_projection_walks_a_subsampled_plate(dtype):
    """A subsampled data plate, the same tensors at every step: the first prediction projects
    one alternating pass over the whole training set (as ``project_training_data`` does)."""
    N, D = 64, 128
    g = torch.Generator().manual_seed(20251)
    x = (torch.randn(N, D, generator=g, dtype=torch.float64) / math.sqrt(D)).to(dtype)
    y = torch.randint(0, 2, (N,), generator=g).to(dtype)
    guide = AutoViking(logreg)
    SVI(logreg, guide, Adam({"lr": 1e-3}), TraceViking_ELBO()).step(x, y)
    assert guide.projected_samples is None
    Predictive(logreg, guide=guide, num_samples=8)(x)
    eps, k = guide.projected_samples
    loc = guide.loc.detach()
    J = torch.cat([jacrev(make_rows_fn(logreg, guide.layout, (x, y), {},
                                       subsample={"data": torch.arange(i, i + 16)}))(loc)
                   for i in range(0, N, 16)])
    ratio = ((J @ k.T).norm() / (J @ eps.T).norm()).item()
    # one batch's kernel only: ≈ 0.87 (3/4 of the data unseen); one pass: measured 0.3
    assert ratio < 0.5, ratio


def test_7_batch_by_batch_training_warns_and_says_what_to_do(float32):
    x, y = regression_data(12, 3)
    guide = AutoViking(linreg)
    svi = SVI(linreg, guide, Adam({"lr": 0.01}), TraceViking_ELBO())
    for i in range(0, 12, 4):
        svi.step(x[i:i + 4], y[i:i + 4])
    with pytest.warns(UserWarning, match="project_training_data"):
        Predictive(linreg, guide=guide, num_samples=3)(x)
    guide.project_training_data(batches=[(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictive(linreg, guide=guide, num_samples=3)(x)


# -- 8: reload ----------------------------------------------------------------------------------
def test_8_training_after_reload_says_set_model(dtype):
    x, y = regression_data(6, 3)
    guide = AutoViking(linreg)
    svi_step = SVI(linreg, guide, Adam({"lr": 0.01}), TraceViking_ELBO()).step
    svi_step(x, y)
    buf = io.BytesIO()
    torch.save(guide, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    # saving projects on the training data first, so the loaded guide predicts as the live one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro.set_rng_seed(3)
        got = Predictive(linreg, guide=loaded, num_samples=4)(x)["y"]
    pyro.set_rng_seed(3)
    torch.testing.assert_close(got, Predictive(linreg, guide=guide, num_samples=4)(x)["y"])
    svi = SVI(linreg, loaded, Adam({"lr": 0.01}), TraceViking_ELBO())
    with pytest.raises(RuntimeError, match="set_model"):
        svi.step(x, y)
    loaded.set_model(linreg)
    assert math.isfinite(svi.step(x, y))


# -- 9: AutoGuideList: the other guides' latents at their medians ----------------------------------
def test_9_auto_guide_list_jacobian_at_other_guides_medians(dtype):
    x, y = regression_data(6, 3)
    guide = AutoGuideList(noisy_linreg)
    guide.append(AutoViking(poutine.block(noisy_linreg, hide=["sigma"])))
    guide.append(AutoNormal(poutine.block(noisy_linreg, expose=["sigma"])))
    guide(x, y)
    viking = guide[0]
    J1 = viking.last_projector.operator.to_dense()
    guide(x, y)
    J2 = viking.last_projector.operator.to_dense()
    torch.testing.assert_close(J1, J2)  # same θ̂, same P (before: a prior draw of sigma)
    sigma = guide[1].median()["sigma"]
    J_ref = jacrev(make_rows_fn(noisy_linreg, viking.layout, (x, y), {},
                                condition={"sigma": sigma}))(viking.loc.detach())
    torch.testing.assert_close(J1, J_ref)
    losses = [SVI(noisy_linreg, guide, Adam({"lr": 0.02}), TraceViking_ELBO()).step(x, y)
              for _ in range(20)]
    assert all(map(math.isfinite, losses))


def noisy_linreg_subsampled(x, y=None):
    """Global latents only, data plate subsampled 8 at a time."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample_size=8) as idx:
        return pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), sigma),
                           obs=None if y is None else y[idx])


def test_9_auto_guide_list_with_a_subsampled_plate_and_global_latents(dtype):
    """The list's own plates hold no data plate when every latent is global: the AutoViking part
    adds it, so its projection and the model use the same minibatch (before: "plate 'data'
    draws random subsample indices")."""
    x, y = regression_data(40, 3)
    model = noisy_linreg_subsampled
    guide = AutoGuideList(model)
    guide.append(AutoViking(poutine.block(model, hide=["sigma"])))
    guide.append(AutoNormal(poutine.block(model, expose=["sigma"])))
    guide(x, y)  # set up
    guide_trace = poutine.trace(guide).get_trace(x, y)
    idx = guide_trace.nodes["data"]["value"]
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    assert torch.equal(model_trace.nodes["data"]["value"], idx)
    viking = guide[0]
    sigma = guide[1].median()["sigma"]
    J_ref = jacrev(make_rows_fn(model, viking.layout, (x, y), {}, subsample={"data": idx},
                                condition={"sigma": sigma}))(viking.loc.detach())
    torch.testing.assert_close(viking.last_projector.operator.to_dense(), J_ref)
    svi = SVI(model, guide, Adam({"lr": 0.02}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(10))
    samples = Predictive(model, guide=guide, num_samples=4)(x)
    assert samples["y"].shape == (4, 8)


def _projected_guide(model, x, y, num_samples):
    """An AutoViking after 5 SVI steps, its prediction samples projected on (x, y)."""
    guide = AutoViking(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), TraceViking_ELBO())
    for _ in range(5):
        svi.step(x, y)
    guide.project_training_data(x, y, num_samples=num_samples)
    return guide


def test_predictive_draws_each_projected_sample_once_without_a_warning(float32):
    """Predictive runs the guide twice before its S draws (pyro 1.9): S projected samples
    serve S distinct predictions, silently; one more draw than that warns."""
    x, y = regression_data(20, 3)
    guide = _projected_guide(linreg, x, y, num_samples=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = Predictive(linreg, guide=guide, num_samples=10)(x)["w"].reshape(10, 3)
    assert torch.unique(w, dim=0).shape[0] == 10
    with pytest.warns(UserWarning, match="11 draws on the same inputs but only 10"):
        Predictive(linreg, guide=guide, num_samples=11)(x[:5])


def test_prediction_draws_without_gradients_equal_the_differentiable_draws(dtype):
    """Predictive (no gradients) writes θ̂ + σ_im e + (σ_ker − σ_im) k straight from the cached
    samples, run by run of the cycle; with gradients on, the same values come from a gather
    and they reach loc and the scales."""
    x, y = regression_data(20, 3)
    guide = _projected_guide(noisy_linreg, x, y, num_samples=6)
    with poutine.mask(mask=False):
        q = guide.get_posterior(x)
    draws = {}
    for grad in (False, True):
        q.state.counter = 4  # 4, 5, then 0, 1, ...: a run that wraps around the cache
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 9 draws of 6 samples repeat, by design here
            draws[grad] = q.rsample((9,))
    torch.testing.assert_close(draws[False], draws[True].detach())
    e, k = q.noise[[4, 5, 0, 1, 2, 3, 4, 5, 0]], q.kernel[[4, 5, 0, 1, 2, 3, 4, 5, 0]]
    ref = q.loc + q.kernel_scale * k + q.image_scale * (e - k)
    torch.testing.assert_close(draws[True].detach(), ref.detach())
    draws[True].sum().backward()
    assert guide.loc.unconstrained().grad is not None


# -- 10, 11, 12, 13: clear errors ---------------------------------------------------------------
def test_10_discrete_latent_hidden_from_the_guide_raises(float32):
    def model(y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w + c.to(y.dtype), 1.0), obs=y)

    guide = AutoViking(poutine.block(model, hide=["c"]))
    with pytest.raises(ValueError, match="discrete latent 'c'"):
        guide(torch.randn(4))


def test_11_local_latent_in_subsampled_plate_raises_and_autoguidelist_works(float32):
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=4) as idx:
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(w * x[idx] + b, 0.5), obs=y[idx])

    x, y = torch.randn(12), torch.randn(12)
    with pytest.raises(ValueError, match="AutoGuideList"):
        AutoViking(model)(x, y)
    guide = AutoGuideList(model)
    guide.append(AutoViking(poutine.block(model, hide=["b"])))
    guide.append(AutoNormal(poutine.block(model, expose=["b"])))
    svi = SVI(model, guide, Adam({"lr": 0.01}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(5))


def test_12_jit_trace_elbo_raises_a_clear_error(float32):
    x, y = regression_data(6, 3)
    svi = SVI(linreg, AutoViking(linreg), Adam({"lr": 0.01}), JitTrace_ELBO())
    with pytest.raises(NotImplementedError, match="JitTrace_ELBO"):
        svi.step(x, y)


def test_13_errors_say_what_happened_and_what_to_do(float32):
    x, y = regression_data(6, 3)
    guide = AutoViking(linreg)
    with pytest.raises(RuntimeError, match="before predicting"):
        Predictive(linreg, guide=guide, num_samples=2)(x)
    with pytest.raises(RuntimeError, match="not set up"):
        guide.quantiles([0.5])
    with pytest.raises(RuntimeError, match="not set up"):
        _ = guide.kernel_scale
    guide(x, y)
    with torch.no_grad():
        guide.loc[0] = float("nan")  # what an lr blow-up leaves
    with pytest.raises(ValueError, match="training diverged"):
        SVI(linreg, guide, Adam({"lr": 0.01}), TraceViking_ELBO()).step(x, y)


def test_13a_non_finite_initial_values_name_the_site(float32):
    """init_to_mean of a HalfCauchy (infinite mean) is refused at set-up, naming the site and
    the fix, instead of a "training diverged" error at the first step."""
    from pyro.infer.autoguide import init_to_mean

    pyro.clear_param_store()
    x, y = regression_data(6, 3)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w, tau), obs=y)

    with pytest.raises(ValueError, match="initial values are not finite at tau .*init_to_median"):
        SVI(model, AutoViking(model, init_loc_fn=init_to_mean), Adam({"lr": 0.01}),
            TraceViking_ELBO()).step(x, y)


def test_13b_another_models_guide_params_in_the_store_are_named(float32):
    """A second model fitted without clearing Pyro's param store (its parameters are named
    after the guide class) gets an error naming the stale parameter and the fix, not a shape
    error from inside the guide; the same model picks its own parameters up again."""
    pyro.clear_param_store()
    x, y = regression_data(6, 3)
    SVI(linreg, AutoViking(linreg), Adam({"lr": 0.01}), TraceViking_ELBO()).step(x, y)
    again = AutoViking(linreg)
    again(x, y)
    assert torch.equal(again.loc, pyro.param("AutoViking.loc"))

    def wider(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([5]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w[:3] + w[3:].sum(), 1.0), obs=y)

    with pytest.raises(ValueError, match=r"'AutoViking.loc' of shape \(\d+,\).*need \(5,\)"
                                         r".*pyro.clear_param_store\(\)"):
        SVI(wider, AutoViking(wider), Adam({"lr": 0.01}), TraceViking_ELBO()).step(x, y)
    pyro.clear_param_store()
    SVI(wider, AutoViking(wider), Adam({"lr": 0.01}), TraceViking_ELBO()).step(x, y)


# -- 14: a learned kernel scale starts at the prior scale ----------------------------------------
class PriorScaleBNN(PyroModule):
    """A 3-4-1 network with ``PyroParam`` prior scales (one for weights, one for biases, or one
    shared scale)."""

    def __init__(self, weight_scale, bias_scale=None):
        super().__init__()
        self.weight_scale = PyroParam(torch.tensor(weight_scale), constraints.positive)
        if bias_scale is not None:
            self.bias_scale = PyroParam(torch.tensor(bias_scale), constraints.positive)
        bias = (lambda: self.weight_scale) if bias_scale is None else (lambda: self.bias_scale)
        self.l1 = PyroModule[nn.Linear](3, 4)
        self.l1.weight = PyroSample(
            lambda m: dist.Normal(0.0, self.weight_scale).expand([4, 3]).to_event(2))
        self.l1.bias = PyroSample(lambda m: dist.Normal(0.0, bias()).expand([4]).to_event(1))

    def forward(self, x, y=None):
        mean = self.l1(x).sum(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(mean, 1.0), obs=y)


@pytest.mark.parametrize("scales", [(0.1, 0.1), (0.1, 0.2)])
def test_14_learned_kernel_scale_starts_at_the_pyroparam_prior_scale(float32, scales):
    model = PriorScaleBNN(*scales)
    guide = AutoViking(model, kernel_scale="learned")
    guide(torch.randn(5, 3), torch.randn(5))
    ws, bs = scales
    expected = math.sqrt((12 * ws**2 + 4 * bs**2) / 16)  # RMS over the 16 coordinates
    assert float(guide.kernel_scale) == pytest.approx(expected, rel=1e-5)


# -- 15: the prediction-time posterior reports moments of the training-data samples ---------------
def test_15_prediction_posterior_moments(dtype):
    """Moments from samples projected on the training data: kernel dimension ``D − N`` (not D),
    marginal variances ``σ_im² + (σ_ker² − σ_im²) diag P``, the matching entropy."""
    N, D, S = 4, 10, 4000
    x, y = regression_data(N, D)
    guide = AutoViking(linreg, init_image_scale=0.05)
    guide(x, y)
    guide.project_training_data(x, y, num_samples=S)
    with poutine.mask(mask=False):
        q_pred = guide.get_posterior(x[:2])
    with torch.no_grad():
        q_train = guide.get_posterior(x, y)  # the exact family member on the training data
    R = D - N
    assert abs(q_pred.kernel_dim.item() - R) < 4 * math.sqrt(2 * R / S) * 3, q_pred.kernel_dim
    torch.testing.assert_close(q_pred.variance, q_train.variance.to(q_pred.variance.dtype),
                               rtol=0.1, atol=0.1 * float(guide.kernel_scale) ** 2)
    assert abs(q_pred.entropy().item() - q_train.entropy().item()) < 0.5
    with pytest.raises(NotImplementedError, match="training mode"):
        q_pred.log_prob(torch.zeros(D))


# -- #12 point 4: prediction without duplicate model runs ---------------------------------------
def test_predictive_runs_the_model_once_per_sample_with_a_learned_prior_scale(float32):
    """A ``pyro.param`` prior scale read inside ``PyroSample``: the guide reads it from the param
    store, without running the network (before: 205 network calls for 100 samples)."""
    model = PriorScaleBNN(0.5)  # one shared scale: σ_ker is tied to it
    calls = []
    model.l1.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(8, 3), torch.randn(8)
    guide = AutoViking(model)
    SVI(model, guide, Adam({"lr": 0.01}), TraceViking_ELBO()).step(x, y)
    assert guide.kernel_scale_source == "prior"
    guide.project_training_data(x, y, num_samples=60)  # the 5 + 52 draws below: no repeats
    x_test = torch.randn(5, 3)
    for G in (AutoNormal, AutoViking):
        g = guide if G is AutoViking else AutoNormal(model)
        if G is AutoNormal:
            g(x, y)
        Predictive(model, guide=g, num_samples=3)(x_test)  # first call: shape checks
        calls.clear()
        Predictive(model, guide=g, num_samples=50)(x_test)
        assert len(calls) == 52, (G.__name__, len(calls))  # model: 50 + 2 set-up runs


def test_predictive_parallel_with_a_learned_prior_scale(dtype):
    """``Predictive(parallel=True)`` with a ``pyro.param`` prior scale: the guide reads the scale
    without running the model under Predictive's sample plate (before: the data plate and
    ``_num_predictive_samples`` collided at dim -1)."""
    def model(x, y=None):
        s = pyro.param("prior_scale", torch.tensor(0.7), constraint=constraints.positive)
        a = pyro.sample("a", dist.Normal(0.0, s))
        b = pyro.sample("b", dist.Normal(0.0, s))
        with pyro.plate("data", x.shape[0], dim=-1):  # an explicit dim, as BNN helpers write
            return pyro.sample("y", dist.Normal(a + b * x, 0.5), obs=y)

    x, y = torch.linspace(-1, 1, 6), torch.linspace(0, 1, 6)
    guide = AutoViking(model)
    SVI(model, guide, Adam({"lr": 0.01}), TraceViking_ELBO()).step(x, y)
    pred = Predictive(model, guide=guide, num_samples=20, parallel=True)(x)
    assert pred["y"].shape == (20, 6) and pred["a"].shape == (20, 1)
