"""A saved guide carries everything it needs to predict: loaded where the param store is empty
(a new process), it predicts as it did when saved, call after call — the model's own learned
parameters (a regression noise scale, the prior scale σ_ker is tied to, point-estimated layers)
included."""

import io

import pyro
import pytest
import torch
from pyro.infer import Predictive
from torch import nn
from torch.distributions import constraints

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO, fit_viking


def _regression(n=80):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return x, torch.sin(x[:, 0]) + 0.3 * torch.randn(n, generator=g)


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("latent", [None, "2.*"], ids=["all latent", "hidden first layer"])
def test_a_loaded_guide_predicts_as_saved_without_the_param_store(default_dtype, latent):
    x, y = _regression()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    bnn = BayesianNetwork(net, "regression", prior_scale="learned", noise_scale="learned",
                          latent=latent)
    fit = fit_viking(bnn, x, y, num_steps=40, warmup_steps=60, progress=False,
                     optim=pyro.optim.Adam({"lr": 1e-2}))
    noise, prior = float(pyro.param("bnn.noise_scale")), float(pyro.param("bnn.prior_scale"))
    assert noise != pytest.approx(bnn.init_noise_scale)  # the fit moved them
    assert prior != pytest.approx(bnn.init_prior_scale)

    def predict(model, guide, seed):
        pyro.set_rng_seed(seed)
        return Predictive(model, guide=guide, num_samples=50)(x)["obs"]

    # samples projected on the training data first, as before any prediction: a guide left to
    # project lazily draws them inside its first Predictive calls (random numbers that a loaded
    # guide, which has them saved, does not draw)
    fit.guide.project_training_data(x, y, num_samples=200)
    before = [predict(bnn, fit.guide, s) for s in (3, 4)]
    sigma_ker = float(fit.guide.kernel_scale)
    model, guide = _round_trip((bnn, fit.guide))
    pyro.clear_param_store()  # as in a fresh process
    after = [predict(model, guide, s) for s in (3, 4)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    assert float(guide.kernel_scale) == pytest.approx(sigma_ker)
    assert float(pyro.param("bnn.noise_scale")) == pytest.approx(noise)


def test_a_loaded_guide_does_not_overwrite_a_param_store_in_use(default_dtype):
    """Loading restores the model's parameters only where the store has none: a store the user
    loaded or trained since keeps its values."""
    x, y = _regression()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    bnn = BayesianNetwork(net, "regression", prior_scale="learned", noise_scale="learned")
    fit = fit_viking(bnn, x, y, num_steps=10, warmup_steps=20, progress=False)
    model, guide = _round_trip((bnn, fit.guide))
    pyro.get_param_store()["bnn.noise_scale"] = torch.tensor(0.7)
    Predictive(model, guide=guide, num_samples=4)(x)
    assert float(pyro.param("bnn.noise_scale")) == pytest.approx(0.7)


def _noisy_model(x, y=None):
    w = pyro.sample("w", pyro.distributions.Normal(torch.zeros(3), 1.0).to_event(1))
    noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", pyro.distributions.Normal(x @ w, noise), obs=y)


def test_any_models_params_are_saved_with_the_guide(default_dtype):
    """Not only BayesianNetwork: a plain Pyro model's ``pyro.param`` comes back, with its
    constraint, into an empty param store."""
    x, y = _regression()
    guide = AutoViking(_noisy_model)
    svi = pyro.infer.SVI(_noisy_model, guide, pyro.optim.Adam({"lr": 0.05}), TraceViking_ELBO())
    for _ in range(30):
        svi.step(x, y)
    noise = float(pyro.param("noise"))
    assert noise != pytest.approx(1.0)
    loaded = _round_trip(guide)
    pyro.clear_param_store()
    Predictive(_noisy_model, guide=loaded, num_samples=3)(x)
    assert float(pyro.param("noise")) == pytest.approx(noise)
    restored = pyro.get_param_store().get_state()["constraints"]["noise"]
    assert isinstance(restored, type(constraints.positive))
