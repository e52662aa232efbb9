"""The fused training step (pyro_viking.infer.fused_step) against Pyro's traced step.

Under one seed both paths draw the same minibatches and noise, so every step's loss and the
parameters after training must agree to rounding; and the fused step must stay out of the
cases it does not cover."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDelta, AutoGuideList
from torch import nn

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer import fused_step
from pyro_viking.infer.elbo import fused_applies

STEPS = 6


def _data(likelihood, n=60):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    if likelihood == "classification":
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    elif likelihood == "binary":
        y = (x[:, 0] > 0).to(x.dtype)
    else:
        y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g)
    return x, y


def _bnn(likelihood, **options):
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 1
    net = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, out))
    return BayesianNetwork(net, likelihood, **options)


CASES = {
    "classification, learned prior": ("classification", dict(prior_scale="learned",
                                                             batch_size=16), {}),
    "regression, learned noise": ("regression", dict(prior_scale=0.5, noise_scale="learned",
                                                     batch_size=16), {}),
    "binary, learned kernel scale": ("binary", dict(prior_scale="learned", batch_size=16),
                                     dict(kernel_scale="learned")),
    "last layer latent, hidden first layer": ("classification", dict(
        prior_scale="learned", latent="2", batch_size=16), {}),
    "minibatches with num_data": ("classification", dict(prior_scale="learned",
                                                         num_data=60), {}),
    "no subsampling, carried noise": ("regression", dict(prior_scale="learned"),
                                      dict(image_noise="carried", gamma=0.8)),
    "4 vectorised particles": ("classification", dict(prior_scale="learned", batch_size=16),
                               dict(elbo=dict(num_particles=4, vectorize_particles=True,
                                              max_plate_nesting=1))),
}


def _count_fused(monkeypatch):
    """Count the steps that took the fused path."""
    count = {"fused": 0}
    original = fused_step.fused_loss_and_grads

    def spy(*args, **kwargs):
        loss = original(*args, **kwargs)
        count["fused"] += loss is not None
        return loss

    monkeypatch.setattr(fused_step, "fused_loss_and_grads", spy)
    return count


def _train(case, fused, steps=STEPS):
    likelihood, bnn_options, guide_options = CASES[case]
    guide_options = dict(guide_options)
    elbo_options = guide_options.pop("elbo", {})
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    bnn = _bnn(likelihood, **bnn_options)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=0.05, **guide_options)
    elbo = TraceViking_ELBO(beta=0.1, fused=fused, **elbo_options)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    x, y = _data(likelihood)
    losses, taken = [], []
    for step in range(steps):
        if bnn.num_data is not None:  # a loader's minibatch of 15
            i = torch.arange(15 * step, 15 * step + 15) % len(x)
            args = (x[i], y[i])
        else:
            args = (x, y)
        taken.append(fused_applies(elbo, bnn, guide, args, {}))
        losses.append(svi.step(*args))
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, params, taken, guide


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_the_traced_step(case, default_dtype, monkeypatch):
    count = _count_fused(monkeypatch)
    fused, params_f, taken, guide = _train(case, fused=True)
    assert count["fused"] == STEPS - 1  # the first step sets the guide up
    traced, params_t, taken_t, _ = _train(case, fused=False)
    assert count["fused"] == STEPS - 1
    assert taken == [False] + [True] * (STEPS - 1)
    assert not any(taken_t)
    tol = 1e-4 if default_dtype == torch.float32 else 1e-9
    for a, b in zip(fused, traced):
        assert a == pytest.approx(b, rel=tol, abs=tol), (fused, traced)
    assert params_f.keys() == params_t.keys()
    for name in params_f:
        torch.testing.assert_close(params_f[name], params_t[name], rtol=tol * 10, atol=tol * 10)
    assert guide.last_projector is not None and guide.last_draw is not None


def test_fused_step_is_faster_in_calls_not_in_results():
    """Predictive after fused training sees the same guide state as after traced training."""
    _, _, _, guide_f = _train("classification, learned prior", fused=True)
    pf = pyro.infer.Predictive(guide_f.model, guide=guide_f, num_samples=4)
    x, _ = _data("classification")
    pyro.set_rng_seed(0)
    out = pf(x[:5])
    assert out["obs"].shape == (4, 5)
    assert torch.isfinite(out["logits"]).all()


def _setup(**elbo_options):
    pyro.clear_param_store()
    bnn = _bnn("classification", prior_scale="learned", batch_size=16)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = TraceViking_ELBO(beta=0.1, **elbo_options)
    x, y = _data("classification")
    SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x, y)
    return bnn, guide, elbo, x, y


def test_fused_step_stays_out_of_what_it_does_not_cover():
    bnn, guide, elbo, x, y = _setup()
    assert fused_applies(elbo, bnn, guide, (x, y), {})
    assert not fused_applies(elbo, bnn, guide, (x,), {})  # prediction-style call
    assert not fused_applies(elbo, bnn, guide, (x, y), {"linearise_at": guide.median()})
    with poutine.scale(scale=2.0):  # a user's handler around the step
        assert not fused_applies(elbo, bnn, guide, (x, y), {})
    with pyro.plate("outer", 2):
        assert not fused_applies(elbo, bnn, guide, (x, y), {})
    assert not fused_applies(elbo, poutine.scale(bnn, 2.0), guide, (x, y), {})
    for options in (dict(num_particles=2), dict(fused=False)):  # sequential particles
        bnn, guide, elbo, x, y = _setup(**options)
        assert not fused_applies(elbo, bnn, guide, (x, y), {}), options
    # gradient through P, and a guide that is one part of an AutoGuideList
    pyro.clear_param_store()
    bnn = _bnn("classification", prior_scale="learned", batch_size=16)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, grad_through_projection=True)
    elbo = TraceViking_ELBO()
    SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x, y)
    assert not fused_applies(elbo, bnn, guide, (x, y), {})
    pyro.clear_param_store()
    bnn = _bnn("classification", prior_scale="learned", latent="2")  # no subsampled plate
    guides = AutoGuideList(bnn)
    guides.append(AutoViking(bnn, init_loc_fn=bnn.init_loc_fn))
    guides.append(AutoDelta(poutine.block(bnn, expose=[]), init_loc_fn=bnn.init_loc_fn))
    SVI(bnn, guides, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x, y)
    assert not fused_applies(elbo, bnn, guides[0], (x, y), {})


def test_a_new_call_shape_is_traced_first(monkeypatch):
    """The traced step inspects a call shape it has not seen (e.g. a loader's last, smaller
    batch): non-finite labels in it get the traced path's clear error."""
    count = _count_fused(monkeypatch)
    pyro.clear_param_store()
    bnn = _bnn("regression", prior_scale="learned", num_data=60)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    x, y = _data("regression")
    for _ in range(3):
        svi.step(x[:20], y[:20])
    assert count["fused"] == 2
    y_bad = y[:7].clone()
    y_bad[3] = float("nan")
    with pytest.raises(ValueError, match="finite|nan|NaN"):
        svi.step(x[:7], y_bad)
    assert count["fused"] == 2


def test_fused_step_loss_is_finite_and_decreases():
    """A smoke check of the fused path alone: 60 steps lower the loss."""
    bnn, guide, elbo, x, y = _setup()
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(x, y) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
