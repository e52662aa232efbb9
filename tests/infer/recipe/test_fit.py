"""The VIKING recipe (pyro_viking.infer.recipe.fit): API behaviour and step-size independence."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.infer import Predictive
from pyro.infer.autoguide import init_to_median
from pyro.nn import PyroModule, PyroSample
from sklearn.datasets import make_moons
from torch.distributions import constraints

from pyro_viking import AutoViking, BayesianNetwork
from pyro_viking.infer.recipe.beta_selection import select_beta, validation_nll
from pyro_viking.infer.recipe.fit import VikingFit, fit_viking
from pyro_viking.infer.recipe.warmup import fit_map, set_noise_scale_at_map

PRIOR = "prior_scale"


def moons(dtype, n=96):
    x, y = make_moons(n_samples=n, noise=0.15, random_state=0)
    return torch.tensor(x, dtype=dtype), torch.tensor(y)


class TinyBNN(PyroModule):
    """2-12-2 tanh classifier; every weight has the prior N(0, s²) with s a pyro.param (or a
    fixed float)."""

    def __init__(self, dtype, prior_scale=None, hidden=12):
        super().__init__()
        zero = torch.zeros((), dtype=dtype)

        def scale():
            if prior_scale is not None:
                return torch.tensor(prior_scale, dtype=dtype)
            return pyro.param(PRIOR, lambda: torch.tensor(1.0, dtype=dtype),
                              constraint=constraints.positive)

        def layer(i, o):
            lin = PyroModule[nn.Linear](i, o)
            lin.weight = PyroSample(lambda _: dist.Normal(zero, scale()).expand([o, i]).to_event(2))
            lin.bias = PyroSample(lambda _: dist.Normal(zero, scale()).expand([o]).to_event(1))
            return lin

        self.fc1, self.fc2 = layer(2, hidden), layer(hidden, 2)

    def forward(self, x, y=None, batch_size=None):
        data = pyro.plate("data", x.shape[0], subsample_size=batch_size)
        idx = data.indices
        logits = self.fc2(torch.tanh(self.fc1(x[idx])))
        with data:
            pyro.deterministic("probs", logits.softmax(-1), event_dim=1)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def _fit(dtype, lr, seed=0, **options):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, y = moons(dtype)
    model = TinyBNN(dtype, **options.pop("model_options", {}))
    opts = dict(num_steps=150, warmup_steps=400, beta=0.1, prior_scale_param=PRIOR,
                optim=pyro.optim.Adam({"lr": lr}), progress=False, curvature_batches=4)
    opts.update(options)
    return fit_viking(model, x, y, 48, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_viking_returns_guide_and_history(dtype):
    fit = _fit(dtype, 1e-2, num_steps=20, warmup_steps=30)
    assert isinstance(fit, VikingFit) and isinstance(fit.guide, AutoViking)
    h = fit.history
    assert h["phase"] == ["map"] * 30 + ["elbo"] * 20
    assert all(math.isfinite(v) for v in h["loss"])
    assert all(math.isnan(v) for v in h["image_scale"][:30])
    # the guide starts from the curvature scales and the prior scale was set to its optimum
    assert h["prior_scale"][29] == pytest.approx(1.0)  # untouched by the MAP warm-up
    assert fit.init["prior_scale"] != pytest.approx(1.0, rel=1e-3)
    assert h["image_scale"][30] == pytest.approx(fit.init["image_scale"], rel=0.2)
    assert fit.guide.loc.dtype == dtype
    assert float(fit.guide.kernel_scale) == pytest.approx(h["prior_scale"][-1], rel=0.02)


@pytest.mark.parametrize("engine", ["svi", "module"])
def test_fixed_prior_and_batches(engine):
    """An iterable of batches (the model scales its likelihood itself) and a fixed prior."""
    dtype = torch.float64
    x, y = moons(dtype)
    model = TinyBNN(dtype, prior_scale=0.7)

    def batched(xb, yb, idx):
        with pyro.poutine.scale(scale=len(x) / len(idx)):
            model(xb, yb)

    batches = [(x[i], y[i], i) for i in torch.arange(len(x)).chunk(2)]
    fit = fit_viking(batched, batches=batches, num_steps=10, warmup_steps=20, beta=0.3,
                     optim=pyro.optim.Adam({"lr": 1e-2}), progress=False, curvature_batches=2,
                     engine=engine)
    assert fit.init["prior_scale"] == pytest.approx(0.7)
    assert float(fit.guide.kernel_scale) == pytest.approx(0.7)
    assert fit.statistics.num_batches == 2
    assert fit.statistics.image_dim <= len(x) / 2


def test_scales_do_not_depend_on_the_learning_rate():
    """With the curvature start, halving or doubling Adam's learning rate leaves σ_im and the
    learned prior scale (= σ_ker) where they were, within 20 %; from the paper's fixed initial
    scales the same budget ends far from there. (β = 1: with a weakly weighted prior the MAP
    warm-up on separable data does not converge, and θ̂ itself then depends on the step size.)"""
    ends = {}
    for lr in (5e-3, 1e-2, 2e-2):
        h = _fit(torch.float32, lr, beta=1.0).history
        ends[lr] = (h["image_scale"][-1], h["prior_scale"][-1])
    ref = ends[1e-2]
    for lr, (im, prior) in ends.items():
        assert im == pytest.approx(ref[0], rel=0.2), (lr, ends)
        assert prior == pytest.approx(ref[1], rel=0.2), (lr, ends)
    # the paper's start (σ_im = e⁻², prior scale at its initial 1) has not arrived
    h = _fit(torch.float32, 1e-2, beta=1.0, init_scales=False).history
    assert h["prior_scale"][-1] > 1.5 * ref[1]


def test_select_beta_and_validation_nll():
    dtype = torch.float32
    x, y = moons(dtype, n=120)
    xt, yt, xv, yv = x[:80], y[:80], x[80:], y[80:]
    model = TinyBNN(dtype)
    choice = select_beta(model, xt, yt, 40, validation=(xv, yv), betas=[1.0, 0.03],
                         num_steps=30, warmup_steps=100, num_samples=8, prior_scale_param=PRIOR,
                         optim_factory=lambda: pyro.optim.Adam({"lr": 1e-2}), progress=False)
    # every recipe at every β (the defaults: the full ELBO and the posterior at a MAP)
    assert [(r["recipe"], r["beta"]) for r in choice.table] == [
        ("elbo", 1.0), ("elbo", 0.03), ("post-hoc", 1.0), ("post-hoc", 0.03)]
    best = min(choice.table, key=lambda r: r["val_nll"])
    assert (choice.recipe, choice.beta) == (best["recipe"], best["beta"])
    # the param store holds the chosen fit: its guide reports the chosen run's scales
    row = best
    image_scale = float(choice.fit.guide.image_scale.detach())
    assert image_scale == pytest.approx(row["image_scale"], rel=1e-5)
    # validation_nll is the NLL of the Bayesian model average of the predicted probabilities
    nll = validation_nll(model, choice.fit.guide, xv, yv, num_samples=8)
    probs = pyro.infer.Predictive(model, guide=choice.fit.guide, num_samples=8,
                                  return_sites=["probs"])(xv)["probs"].reshape(8, len(xv), 2)
    ref = -probs.double().mean(0)[torch.arange(len(xv)), yv].log()
    assert nll.shape == (len(xv),)
    torch.testing.assert_close(nll, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["svi", "module"])
def test_scales_lr_factor_and_scales_phase(engine):
    """`scales_lr_factor=0` freezes σ_im and the prior scale in the ELBO phase; the optional
    scales-only phase leaves θ̂ at the MAP while the scales train."""
    fit = _fit(torch.float32, 1e-2, num_steps=10, warmup_steps=30, scales_steps=10,
               scales_lr_factor=0.0, engine=engine)
    h = fit.history
    assert h["phase"] == ["map"] * 30 + ["scales"] * 10 + ["elbo"] * 10
    assert len(set(h["image_scale"][30:])) == 1  # lr 0 for the scales, in both phases
    assert len(set(h["prior_scale"][30:])) == 1

    fit = _fit(torch.float32, 1e-2, num_steps=0, warmup_steps=30, scales_steps=10,
               engine=engine)
    h = fit.history
    assert len(set(h["image_scale"][30:])) > 1
    loc = fit.guide.loc.detach()
    map_loc = torch.cat([fit.map_values[n].reshape(-1) for n in
                         ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")])
    torch.testing.assert_close(loc, map_loc)


@pytest.mark.parametrize("engine", ["svi", "module"])
def test_no_elbo_steps_gives_the_posterior_at_the_map(default_dtype, engine):
    """``num_steps=0``: the guide is set up at the MAP with the curvature scales (no ELBO
    step) and predicts right away."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = moons(default_dtype)
    model = TinyBNN(default_dtype)
    fit = fit_viking(model, x, y, 48, num_steps=0, warmup_steps=100, beta=0.1,
                     prior_scale_param=PRIOR, optim=pyro.optim.Adam({"lr": 1e-2}),
                     progress=False, curvature_batches=4, engine=engine)
    guide = fit.guide
    assert set(fit.history["phase"]) == {"map"}
    map_loc = torch.cat([fit.map_values[n].reshape(-1) for n in
                         ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")])
    torch.testing.assert_close(guide.loc.detach(), map_loc)
    assert float(guide.image_scale.detach()) == pytest.approx(fit.init["image_scale"], rel=1e-5)
    assert float(guide.kernel_scale) == pytest.approx(fit.init["prior_scale"], rel=1e-5)
    probs = Predictive(model, guide=guide, num_samples=8)(x)["probs"]
    assert probs.shape == (8, len(x), 2) and probs.dtype == default_dtype
    assert probs.std(0).max() > 0  # samples of the posterior, not a point


def test_map_warmup_starts_from_the_networks_initialisation(default_dtype):
    """A BayesianNetwork's warm-up starts at its PyTorch initialisation (its ``init_loc_fn``),
    not at Pyro's default ``init_to_median`` (≈ the all-zero network of a zero-mean prior,
    which cost the digits benchmark 0.03 of test NLL: 0.088 vs 0.047 after 60 epochs)."""
    x, y = moons(default_dtype, n=200)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    model = BayesianNetwork(net, prior_scale="learned", init_prior_scale=0.1, batch_size=50)
    start = fit_map(model, x, y, num_steps=0, progress=False)
    for name, p in net.named_parameters():
        torch.testing.assert_close(start[model.site_name(name)], p.detach(), rtol=0, atol=0)
    pyro.clear_param_store()  # else the AutoDelta's params of the first call are reused
    median = fit_map(model, x, y, num_steps=0, init_loc_fn=init_to_median, progress=False)
    assert float(median["bnn.0.weight"].abs().max()) < 0.1 < float(net[0].weight.abs().max())


@pytest.mark.parametrize("prior_scale,warns", [(1.0, True), (0.03, False), ("learned", False)])
def test_a_fixed_prior_far_wider_than_the_kernel_scale_warns(prior_scale, warns):
    """With σ_ker tied to a fixed prior scale, a prior far wider than the kernel scale the ELBO
    prefers at the MAP (a 5-16-16-3 relu net under N(0, 1): ≈ 36×) warns with the predicted
    cost and the fixes, and its posterior predicts far worse than the MAP network; a narrower
    fixed prior or a learned one do not warn, and their posteriors predict as well as it."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    x = torch.randn(500, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    bnn = BayesianNetwork(net, prior_scale=prior_scale, batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_viking(bnn, x, y, num_steps=0, warmup_steps=150, optim=pyro.optim.Adam(
            {"lr": 1e-2}), progress=False)
    wide = [w for w in caught if "fixed prior scale" in str(w.message)]
    assert bool(wide) == warns, [str(w.message) for w in caught]
    if warns:
        message = str(wide[0].message)
        assert "s = 1," in message and "prior_scale='learned'" in message
        assert "kernel_scale='learned'" in message and wide[0].filename == __file__
    probs = Predictive(bnn, guide=fit.guide, num_samples=30)(x)["logits"].softmax(-1).mean(0)
    accuracy = float((probs.argmax(-1) == y).float().mean())
    with torch.no_grad():
        map_accuracy = float((bnn.set_weights(fit.map_values)(x).argmax(-1) == y).float().mean())
    if warns:
        assert accuracy < map_accuracy - 0.1
    else:
        assert accuracy > map_accuracy - 0.05


def test_select_beta_on_a_subsampling_bayesian_network(default_dtype):
    """``select_beta`` / ``validation_nll`` on a ``BayesianNetwork`` whose ``batch_size`` is
    below the validation size (its plate subsamples at random): every validation datum is
    scored once, and the NLL equals the same network's without subsampling."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    x = torch.randn(300, 5, dtype=default_dtype)
    y = (x[:, 0] > 0).long()
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2)).to(default_dtype)
    bnn = BayesianNetwork(net, prior_scale="learned", batch_size=64)
    res = select_beta(bnn, x[:200], y[:200], validation=(x[200:], y[200:]), betas=(0.1, 0.001),
                      num_steps=30, warmup_steps=60, progress=False, recipes=("elbo",),
                      optim_factory=lambda: pyro.optim.Adam({"lr": 1e-2}))
    assert res.beta in (0.1, 0.001) and all(math.isfinite(r["val_nll"]) for r in res.table)
    whole = BayesianNetwork(net, prior_scale="learned", batch_size=None)  # same names
    nlls = []
    for model in (bnn, whole):
        pyro.set_rng_seed(1)
        nlls.append(validation_nll(model, res.fit.guide, x[200:], y[200:]))
    assert nlls[0].shape == (100,)
    torch.testing.assert_close(nlls[0], nlls[1])
    assert float(nlls[0].mean()) < math.log(2)  # better than chance on a separable label


def test_learned_regression_noise_starts_at_its_maximum_likelihood_value(default_dtype):
    """A BayesianNetwork's learned noise scale is set, before the curvature scales, to the
    root mean squared residual of the MAP network on the training data (its maximum-likelihood
    value): from the default 0.1 the warm-up's Adam steps would leave it near 0.15 where the
    data's noise is 0.3, and the 90 % predictive interval would cover about 56 % of the data.
    The same from ``batches=``; other models are left alone."""
    torch.manual_seed(0)
    x = torch.randn(300, 3, dtype=default_dtype)
    y = 2 * x[:, 0] + 0.3 * torch.randn(300, dtype=default_dtype)

    def bnn(**kw):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(default_dtype)
        return BayesianNetwork(net, "regression", prior_scale="learned", noise_scale="learned",
                               **kw)

    model = bnn(batch_size=64)
    fit = fit_viking(model, x, y, warmup_steps=300, num_steps=0, beta=0.01, progress=False,
                     optim=pyro.optim.Adam({"lr": 1e-2}), curvature_batches=2)
    latent = {n: fit.map_values[model.site_name(n)] for n in model.latent_shapes}
    with torch.no_grad():
        rms = float((model.forward_network(latent, x).squeeze(-1) - y).pow(2).mean().sqrt())
    noise = float(pyro.param(model.noise_scale_name).detach())
    assert noise == pytest.approx(rms, rel=1e-4)
    assert 0.2 < noise < 0.45
    draws = Predictive(model, guide=fit.guide, num_samples=100, parallel=True)(x)["obs"]
    lo, hi = draws.quantile(0.05, 0), draws.quantile(0.95, 0)
    assert 0.8 < float(((y > lo) & (y < hi)).double().mean()) < 0.97

    pyro.clear_param_store()
    model = bnn(num_data=300)
    batches = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50)]
    fit = fit_viking(model, batches=batches, warmup_steps=6, num_steps=0, progress=False,
                     curvature_batches=2)
    latent = {n: fit.map_values[model.site_name(n)] for n in model.latent_shapes}
    with torch.no_grad():  # the first curvature_batches batches
        rms = float((model.forward_network(latent, x[:100]).squeeze(-1) - y[:100])
                    .pow(2).mean().sqrt())
    assert float(pyro.param(model.noise_scale_name).detach()) == pytest.approx(rms, rel=1e-4)
    assert set_noise_scale_at_map(TinyBNN(default_dtype), fit.map_values, x, y) is None
