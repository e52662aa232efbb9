"""Errors of AutoViking that say what happened and what to do: a discrete latent hidden from the
guide, ``JitTrace_ELBO``, predicting or reading the scales before set-up, a diverged training
run, non-finite initial values, and another model's parameters left in Pyro's param store.
(Errors of Pyro's autoguide checklist: ``test_guide_pyro_behaviour.py``.)
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from problems import linreg, linreg_data
from pyro.infer import SVI, JitTrace_ELBO, Predictive
from pyro.infer.autoguide import init_to_mean
from pyro.optim import Adam

from pyro_viking import AutoViking, TraceViking_ELBO


def test_discrete_latent_hidden_from_the_guide_raises(float32):
    """An enumerated discrete latent hidden from the guide is named in the error."""
    def model(y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w + c.to(y.dtype), 1.0), obs=y)

    guide = AutoViking(poutine.block(model, hide=["c"]))
    with pytest.raises(ValueError, match="discrete latent 'c'"):
        guide(torch.randn(4))


def test_jit_trace_elbo_raises_a_clear_error(float32):
    x, y = linreg_data(6, 3)
    svi = SVI(linreg, AutoViking(linreg), Adam({"lr": 0.01}), JitTrace_ELBO())
    with pytest.raises(NotImplementedError, match="JitTrace_ELBO"):
        svi.step(x, y)


def test_errors_say_what_happened_and_what_to_do(float32):
    """Predicting, ``quantiles`` or ``kernel_scale`` before set-up, and a step from a non-finite
    ``loc`` (what a learning-rate blow-up leaves) raise errors that say so."""
    x, y = linreg_data(6, 3)
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


def test_non_finite_initial_values_name_the_site(float32):
    """init_to_mean of a HalfCauchy (infinite mean) is refused at set-up, naming the site and
    the fix, instead of a "training diverged" error at the first step."""
    pyro.clear_param_store()
    x, y = linreg_data(6, 3)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w, tau), obs=y)

    with pytest.raises(ValueError, match="initial values are not finite at tau .*init_to_median"):
        SVI(model, AutoViking(model, init_loc_fn=init_to_mean), Adam({"lr": 0.01}),
            TraceViking_ELBO()).step(x, y)


def test_another_models_guide_params_in_the_store_are_named(float32):
    """A second model fitted without clearing Pyro's param store (its parameters are named
    after the guide class) gets an error naming the stale parameter and the fix, not a shape
    error from inside the guide; the same model picks its own parameters up again."""
    pyro.clear_param_store()
    x, y = linreg_data(6, 3)
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
