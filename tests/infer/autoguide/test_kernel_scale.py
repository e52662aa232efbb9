"""The σ_ker policy of AutoViking (``kernel_scale=``): a learned σ_ker starts at the model's
common prior scale (the RMS over the coordinates of ``PyroParam`` prior scales) or at
``init_kernel_scale``; a σ_ker tied to a ``pyro.param`` prior scale is read from the param
store without running the model, so ``Predictive`` runs the model once per sample and
``Predictive(parallel=True)`` works.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample
from pyro.optim import Adam
from torch import nn
from torch.distributions import constraints

from pyro_viking import AutoViking, TraceViking_ELBO


def test_learned_kernel_scale_starts_at_the_common_prior_scale():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 0.3).expand([4]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    x, y = torch.randn(3, 4), torch.randn(3)
    guide = AutoViking(model, kernel_scale="learned")
    guide(x, y)
    assert float(guide.kernel_scale) == pytest.approx(0.3)
    pyro.clear_param_store()  # parameters are shared by name across guides of one class
    guide = AutoViking(model, kernel_scale="learned", init_kernel_scale=2.0)
    guide(x, y)
    assert float(guide.kernel_scale) == pytest.approx(2.0)


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
def test_learned_kernel_scale_starts_at_the_pyroparam_prior_scale(float32, scales):
    """Weights' and biases' ``PyroParam`` prior scales: a learned σ_ker starts at their RMS over
    the 16 coordinates."""
    model = PriorScaleBNN(*scales)
    guide = AutoViking(model, kernel_scale="learned")
    guide(torch.randn(5, 3), torch.randn(5))
    ws, bs = scales
    expected = math.sqrt((12 * ws**2 + 4 * bs**2) / 16)  # RMS over the 16 coordinates
    assert float(guide.kernel_scale) == pytest.approx(expected, rel=1e-5)


def test_predictive_runs_the_model_once_per_sample_with_a_learned_prior_scale(float32):
    """A ``pyro.param`` prior scale read inside ``PyroSample``: the guide reads it from the param
    store, without running the network, so ``Predictive`` runs the network as often with
    AutoViking as with AutoNormal (once per sample and twice to set up)."""
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
    without running the model under Predictive's sample plate, so the data plate (an explicit
    ``dim=-1``) and the sample plate do not collide."""
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
