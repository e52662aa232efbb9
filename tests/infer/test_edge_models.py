"""Models at the edges of what VIKING reads from a trace, and training that goes wrong: a global
``pyro.factor`` penalty is not a datum, sites rewritten by ``poutine.reparam`` are not data, a
guide part hidden behind any callable is either conditioned on or refused, a diverging fit is
stopped with its cause, a learned noise scale that collapses onto an interpolating MAP is warned
about, and evaluating a loss does not advance the training state."""

import functools
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList
from pyro.infer.reparam import LocScaleReparam
from torch import nn

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO, fit_viking
from pyro_viking.infer.autoguide import projector_choice
from pyro_viking.infer.autoguide.training_projection import call_projector
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn


def _linreg(x, y=None, penalty=False):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    if penalty:
        pyro.factor("penalty", -0.5 * (w ** 2).sum())
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def _xy(n=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(n, generator=g)


def _rows(model, x, y, **kwargs):
    trace = poutine.trace(model).get_trace(x, y, **kwargs)
    layout = LatentLayout.from_trace(trace)
    return layout, make_rows_fn(model, layout, (x, y), kwargs)


def test_a_global_factor_is_not_a_datum_row(default_dtype):
    """The rows are the N data; a penalty ``pyro.factor`` under no plate adds none."""
    x, y = _xy()
    layout, rows = _rows(_linreg, x, y, penalty=True)
    _, plain = _rows(_linreg, x, y)
    z = torch.randn(layout.latent_dim)
    assert rows(z).shape == (8,)
    torch.testing.assert_close(rows(z), plain(z))


def _hier(x, y=None):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(loc * torch.ones(3), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def test_sites_rewritten_by_reparam_are_not_data(default_dtype):
    """``poutine.reparam`` records the original site as an observed, masked ``Delta``: no rows
    come from it and no 'one row for several values' warning."""
    x, y = _xy()
    model = poutine.reparam(_hier, config={"w": LocScaleReparam(centered=0.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout, rows = _rows(model, x, y)
        values = rows(torch.randn(sum(s.numel for s in layout.sites)))
    assert values.shape == (8,)
    assert torch.all(values != 0)


def _sigma_model(x, y=None):
    sigma = pyro.sample("sigma", dist.Gamma(2.0, 4.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)


@pytest.mark.parametrize("wrap", ["lambda", "partial"])
def test_a_guide_part_behind_a_callable_is_conditioned_or_refused(default_dtype, wrap,
                                                                 monkeypatch):
    """``AutoViking`` on a blocked model wrapped in a lambda or ``functools.partial``: the
    other part's latent (a Gamma scale) is either set at that part's median in the Jacobian,
    or the set-up says why it cannot be and what to pass instead — never a prior draw."""
    x, y = _xy()
    blocked = poutine.block(_sigma_model, hide=["sigma"])
    viking_model = (lambda *a, **k: blocked(*a, **k)) if wrap == "lambda" \
        else functools.partial(blocked)
    guide = AutoGuideList(_sigma_model)
    guide.append(AutoViking(viking_model))
    guide.append(AutoDelta(poutine.block(_sigma_model, expose=["sigma"])))
    svi = SVI(_sigma_model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    try:
        for _ in range(3):
            svi.step(x, y)
    except ValueError as error:
        assert "sigma" in str(error) and "poutine.block" in str(error)
        return
    viking = guide[0]
    sigma = guide[1].median(x, y)["sigma"]
    assert torch.isfinite(sigma)
    # the rows whose Jacobian the guide projects with are those at sigma = the AutoDelta median
    captured = []

    def capture(*args, **kwargs):
        captured.append(make_rows_fn(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(projector_choice, "make_rows_fn", capture)
    call_projector(viking, (x, y), {}, None)
    loc = viking.loc.detach()
    reference = make_rows_fn(_sigma_model, viking.layout, (x, y), condition={"sigma": sigma})
    assert len(captured) == 1
    torch.testing.assert_close(captured[0](loc), reference(loc))


def test_a_diverging_fit_is_stopped_with_its_cause(default_dtype):
    """At a learning rate far too large the loss grows and σ_im collapses towards zero: the fit
    stops with an error naming the learning rate, not a silent posterior of zero width."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(0)
    bnn = BayesianNetwork(nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)),
                          prior_scale="learned", batch_size=16)
    with pytest.raises(RuntimeError, match="diverg.*learning rate|learning rate.*diverg"):
        fit_viking(bnn, x, y, num_steps=100, warmup_steps=50, progress=False,
                   optim=pyro.optim.Adam({"lr": 10.0}))


def test_a_noise_scale_on_an_interpolating_map_is_warned_about(default_dtype):
    """Three data and a network that interpolates them: the MAP residual says nothing about the
    noise. The recipe warns, naming noise_scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, generator=g)
    y = torch.sin(x[:, 0]) + 0.3 * torch.randn(3, generator=g)
    torch.manual_seed(0)
    bnn = BayesianNetwork(nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 1)),
                          "regression", prior_scale="learned", noise_scale="learned")
    with pytest.warns(UserWarning, match="noise_scale"):
        fit_viking(bnn, x, y, num_steps=5, warmup_steps=400, progress=False,
                   optim=pyro.optim.Adam({"lr": 1e-2}))


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceViking_ELBO])
def test_evaluating_a_loss_does_not_advance_the_training_state(default_dtype, elbo):
    """Two ``loss()`` evaluations under one seed give the same value, under Pyro's
    ``Trace_ELBO`` as under ours; training steps still advance the carried kernel samples."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    bnn = BayesianNetwork(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
                          prior_scale=0.5)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo())
    for _ in range(3):
        svi.step(x, y)
    values = []
    for _ in range(2):
        pyro.set_rng_seed(5)
        values.append(elbo().loss(bnn, guide, x, y))
    assert values[0] == values[1]
    # a training step that leaves the parameters as they are still advances the carry
    SVI(bnn, guide, pyro.optim.Adam({"lr": 0.0}), elbo()).step(x, y)
    pyro.set_rng_seed(5)
    assert elbo().loss(bnn, guide, x, y) != values[0]
