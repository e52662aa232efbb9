"""AutoViking meets the behaviours Pyro expects of an autoguide (after pyro-ppl/pyro
``tests/infer/test_autoguide.py``): site shapes and init strategies, ``median``/``quantiles``,
serialisation, ``AutoGuideList``, ``Predictive``, Pyro's own ELBOs, PyroModule models and helpful
errors (more in ``test_guide_errors.py``)."""

import io
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import (
    init_to_feasible,
    init_to_mean,
    init_to_median,
    init_to_sample,
    init_to_value,
)
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam
from torch import nn

from pyro_viking import AutoViking, TraceViking_ELBO

N = 6


def data(D=3, seed=21):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])[:D] + 0.3 * torch.randn(N, generator=g)
    return x, y


def shapes_model(x, y=None):
    """Scalar, vector, plated, matrix, MVN, simplex and positive latents (D = 18)."""
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
    with pyro.plate("groups", 3):
        z3 = pyro.sample("z3", dist.Normal(0.0, 1.0))
    z4 = pyro.sample("z4", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
    z5 = pyro.sample("z5", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
    z6 = pyro.sample("z6", dist.Dirichlet(torch.ones(3)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    mean = (z1 + x[:, :2] @ z2 + z3.sum() + (x @ z4.T).sum(-1) + x[:, :2] @ z5
            + tau * (x @ z6))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(mean, scale), obs=y)


def linreg(x, y=None):
    """Real-support latents only; vectorisable (``w`` may carry particle dims)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1) + b, 0.3), obs=y)


def noisy_linreg(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


def scalar_model(x, y=None):
    """Scalar latents only: Pyro's ``Predictive(parallel=True)`` reshaping needs this."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    c = pyro.sample("c", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(a + b * x + c * x**2, 0.5), obs=y)


def train(model, guide, args, steps=100, elbo=None, lr=0.05):
    svi = SVI(model, guide, Adam({"lr": lr}), elbo or TraceViking_ELBO())
    return torch.tensor([svi.step(*args) for _ in range(steps)])


def improved(losses, windows=4):
    """The last window's mean loss is below the first's (these runs converge, then fluctuate)."""
    means = losses[: len(losses) // windows * windows].reshape(windows, -1).mean(1)
    return bool(means[-1] < means[0]), means


# -- shapes x init strategies x ELBOs ---------------------------------------------------------
def init_strategy(name):
    if name == "value":  # built in the test: float64 is the default dtype only there
        return init_to_value(values={"z1": torch.tensor(0.3), "z6": torch.tensor([.2, .3, .5])})
    return {"median": init_to_median, "mean": init_to_mean, "sample": init_to_sample,
            "feasible": init_to_feasible}[name]


@pytest.mark.parametrize("Elbo", [TraceViking_ELBO, Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("init", ["median", "mean", "sample", "feasible", "value"])
def test_finite_loss_site_shapes_and_init_strategies(init, Elbo):
    x, y = data()
    init_loc_fn = init_strategy(init)
    guide = AutoViking(shapes_model, init_loc_fn=init_loc_fn)
    loss = Elbo().loss(shapes_model, guide, x, y)
    assert guide.latent_dim == 18
    assert torch.isfinite(torch.tensor(loss)), loss
    median = guide.median()
    assert {k: tuple(v.shape) for k, v in median.items()} == {
        "z1": (), "z2": (2,), "z3": (3,), "z4": (2, 3), "z5": (2,), "z6": (3,), "scale": (),
        "tau": ()}
    assert median["scale"] > 0 and median["tau"] > 0
    assert torch.allclose(median["z6"].sum(), torch.tensor(1.0)) and (median["z6"] > 0).all()
    if Elbo is TraceViking_ELBO:  # one SVI step keeps it finite
        assert torch.isfinite(train(shapes_model, guide, (x, y), steps=1)).all()


def test_init_to_value_sets_median():
    x, y = data()
    inits = {"w": torch.tensor([0.1, -0.2, 0.3]), "b": torch.tensor(0.7)}
    guide = AutoViking(linreg, init_loc_fn=init_to_value(values=inits))
    guide(x, y)
    for name, value in guide.median().items():
        assert torch.equal(value, inits[name])


# -- median and quantiles ------------------------------------------------------------------------
def test_quantiles_shapes_ordering_and_marginal_scales():
    x, y = data(D=3)
    x = torch.cat([x, torch.randn(N, 7)], 1)  # D = 11 > N: a 5-dimensional kernel
    guide = AutoViking(linreg, init_image_scale=0.2)
    with pytest.raises(RuntimeError, match="not set up"):
        guide.quantiles([0.1, 0.5, 0.9])  # before training: says what to do
    train(linreg, guide, (x, y), steps=20)
    # Without data: from samples projected lazily on the training data (every step had them).
    assert (guide.quantiles([0.1, 0.9])["w"].diff(dim=0) > 0).all()
    q = guide.quantiles([0.1, 0.5, 0.9], x, y)
    median = guide.median()
    assert q["w"].shape == (3, 10) and q["b"].shape == (3,)
    for name in ("w", "b"):
        assert torch.equal(q[name][1], median[name])
        assert (q[name][0] < q[name][1]).all() and (q[name][1] < q[name][2]).all()
    # Marginal std = sqrt(σ_im² + (σ_ker² − σ_im²) diag P), P from the dense Jacobian.
    J = guide.last_projector.operator.to_dense()
    P = torch.eye(11) - torch.linalg.pinv(J) @ J
    sk2, si2 = guide.kernel_scale.item() ** 2, guide.image_scale.item() ** 2
    std = (si2 + (sk2 - si2) * P.diagonal()).sqrt()
    z90 = dist.Normal(0.0, 1.0).icdf(torch.tensor(0.9))
    got = torch.cat([q["w"][2] - q["w"][1], (q["b"][2] - q["b"][1])[None]]) / z90
    rtol = 1e-6 if got.dtype == torch.float64 else 1e-4  # (float32: quantile arithmetic)
    assert torch.allclose(got, std, rtol=rtol)
    # Without data, from cached training-data samples (diag P estimated): same shapes/order.
    guide.project_training_data(x, y, num_samples=200)
    q2 = guide.quantiles([0.1, 0.5, 0.9])
    assert q2["w"].shape == (3, 10) and (q2["w"][0] < q2["w"][2]).all()


# -- serialisation ---------------------------------------------------------------------------------
def trained_guide():
    x, y = data()
    guide = AutoViking(noisy_linreg)
    train(noisy_linreg, guide, (x, y), steps=20)
    guide.project_training_data(x, y, num_samples=30)
    return guide, x, y


def predict(guide, x, seed=3):
    pyro.set_rng_seed(seed)
    return Predictive(noisy_linreg, guide=guide, num_samples=10)(x)


@pytest.mark.parametrize("method", ["torch", "pickle"])
def test_save_load_round_trip_predictions_identical(method):
    guide, x, y = trained_guide()
    if method == "torch":
        buf = io.BytesIO()
        torch.save(guide, buf)
        buf.seek(0)
        pyro.clear_param_store()
        loaded = torch.load(buf, weights_only=False)
    else:
        blob = pickle.dumps(guide)
        pyro.clear_param_store()
        loaded = pickle.loads(blob)
    # Same cached samples and the same RNG seed: identical predictions (no model needed).
    expected, actual = predict(guide, x), predict(loaded, x)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # The live guide keeps its model (Pyro's AutoGuide.__getstate__ would clear it) ...
    assert torch.isfinite(train(noisy_linreg, guide, (x, y), steps=1)).all()
    # ... and the loaded one trains again once the model is re-attached.
    loaded.set_model(noisy_linreg)
    assert torch.isfinite(train(noisy_linreg, loaded, (x, y), steps=1)).all()


def test_state_dict_round_trip():
    guide, x, y = trained_guide()
    state = guide.state_dict()
    assert {"loc_unconstrained", "image_scale_unconstrained"} <= set(state)
    pyro.clear_param_store()
    fresh = AutoViking(noisy_linreg)
    fresh(x, y)
    fresh.load_state_dict(state)
    for name, value in guide.median().items():
        assert torch.equal(fresh.median()[name], value)
    assert torch.equal(fresh.image_scale, guide.image_scale)
    for g in (guide, fresh):
        pyro.set_rng_seed(4)
        g.project_training_data(x, y, num_samples=30)
    a, b = predict(guide, x), predict(fresh, x)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-12), name


def test_clear_param_store_keeps_guide_usable():
    guide, x, y = trained_guide()
    loc = guide.loc.detach().clone()
    pyro.clear_param_store()
    assert torch.equal(guide.loc.detach(), loc)  # PyroModule parameters live in the module
    guide(x, y)
    assert torch.isfinite(train(noisy_linreg, guide, (x, y), steps=3)).all()


# -- composition, Predictive, other ELBOs ----------------------------------------------------------
@pytest.mark.parametrize("Other", [AutoDelta, AutoNormal])
def test_auto_guide_list(Other):
    x, y = data()
    guide = AutoGuideList(noisy_linreg)
    guide.append(AutoViking(poutine.block(noisy_linreg, hide=["sigma"])))
    guide.append(Other(poutine.block(noisy_linreg, expose=["sigma"])))
    losses = train(noisy_linreg, guide, (x, y), steps=80)
    ok, means = improved(losses)
    assert torch.isfinite(losses).all() and ok, means
    assert set(guide.median()) == {"w", "sigma"}
    guide[0].project_training_data(x, y, num_samples=20)
    pred = Predictive(noisy_linreg, guide=guide, num_samples=7)(x)
    assert pred["w"].shape == (7, 1, 3) and pred["sigma"].shape == (7, 1)
    assert pred["y"].shape == (7, N)


def test_predictive_sequential_and_parallel():
    x = torch.linspace(-1, 1, 2)  # N = 2 < D = 3: a one-dimensional kernel
    y = torch.tensor([0.3, -0.4])
    guide = AutoViking(scalar_model)
    train(scalar_model, guide, (x, y), steps=20)
    with warnings.catch_warnings():  # projected lazily on the training data: no warning
        warnings.simplefilter("error")
        Predictive(scalar_model, guide=guide, num_samples=2)(x)
    S = 16
    guide.project_training_data(x, y, num_samples=S)
    x_test = torch.linspace(-2, 2, 5)
    seq = Predictive(scalar_model, guide=guide, num_samples=S)(x_test)
    with pytest.warns(UserWarning, match="draws on the same inputs") as caught:  # repeats
        par = Predictive(scalar_model, guide=guide, num_samples=S, parallel=True)(x_test)
    # attributed to this line, not to the Pyro or pyro_viking internals it is raised in
    assert [w.filename for w in caught if "same inputs" in str(w.message)] == [__file__]
    for name in ("a", "b", "c"):
        assert seq[name].shape == par[name].shape == (S, 1)
        # both walk through all S cached samples (from different starting points)
        assert torch.allclose(seq[name].flatten().sort().values,
                              par[name].flatten().sort().values)
    assert seq["y"].shape == par["y"].shape == (S, 5)


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_trains_under_pyro_elbos(Elbo):
    """Real-support latents: Pyro's KL(Delta, p) drops the Delta's log-Jacobian, so
    TraceMeanField_ELBO is biased for constrained latents of any AutoContinuous guide."""
    x, y = data()
    guide = AutoViking(linreg)
    losses = train(linreg, guide, (x, y), steps=60,
                   elbo=Elbo(num_particles=4, vectorize_particles=True))
    ok, means = improved(losses)
    assert torch.isfinite(losses).all() and ok, means


class RandomLinear(nn.Linear, PyroModule):
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))


class LinearRegression(PyroModule):
    def __init__(self, D):
        super().__init__()
        self.linear = RandomLinear(D, 1)

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1)
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("plate", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def test_pyro_module_model():
    x, y = data()
    model = LinearRegression(3)
    guide = AutoViking(model)
    losses = train(model, guide, (x, y), steps=30)
    assert torch.isfinite(losses).all()
    assert guide.backend_used == "layer_gram"
    assert set(guide.median()) == {"linear.weight", "linear.bias", "sigma"}
    guide.project_training_data(x, y, num_samples=10)
    pred = Predictive(model, guide=guide, num_samples=10)(x)
    assert pred["obs"].shape == (10, N) and pred["linear.weight"].shape[-2:] == (1, 3)


# -- helpful errors --------------------------------------------------------------------------------
def test_discrete_latent_error():
    def model(y):
        a = pyro.sample("a", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(a, 1.0), obs=y)

    with pytest.raises(ValueError, match="discrete sample site 'a'"):
        AutoViking(model)(torch.tensor(0.3))


def test_no_observed_sites_warns():
    """Without a likelihood the kernel is the whole space: q = N(loc, σ_ker² I), with a warning
    (Pyro's guides handle such models), attributed to the caller's line."""
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="no observed sites") as caught:
        AutoViking(model)()
    assert caught[0].filename == __file__


def test_non_finite_observation_error_names_site():
    x, y = data()
    y[2] = float("nan")
    with pytest.raises(ValueError, match="observed site 'y' has non-finite"):
        AutoViking(linreg)(x, y)


def test_latent_shape_change_error():
    x, y = data()
    guide = AutoViking(linreg)
    train(linreg, guide, (x, y), steps=2)
    x4 = torch.randn(N, 4)
    with pytest.raises(ValueError, match=r"latent 'w' of shape \(3,\).*\(4,\)"):
        guide(x4, y)
    with pytest.raises(ValueError, match="latent 'w'"):
        TraceViking_ELBO().loss(linreg, guide, x4, y)
    with pytest.raises(ValueError, match="latent 'w'"):
        Predictive(linreg, guide=guide, num_samples=2)(x4)
    guide(x, y)  # the set-up shapes still work
    guide(x[:4], y[:4])  # other data sizes too


def test_kernel_scale_prior_needs_isotropic_normal_priors():
    with pytest.raises(ValueError, match="kernel_scale='learned'"):
        AutoViking(noisy_linreg, kernel_scale="prior")(*data())


@pytest.mark.parametrize("kwargs", [
    dict(gamma=1.5), dict(gamma=-0.1), dict(jacobian="hessian"), dict(kernel_scale="wide"),
    dict(kernel_scale=-1.0), dict(image_noise="stale"), dict(backend="gpu"),
    dict(solver="lu"), dict(rank_estimator="guess"), dict(init_image_scale=0.0),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_guide_arguments(kwargs):
    name = next(iter(kwargs)).replace("init_", "")
    with pytest.raises(ValueError, match=name):
        AutoViking(linreg, **kwargs)

