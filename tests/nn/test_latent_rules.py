"""Which parameters of a ``BayesianNetwork`` are latent (``pyro_viking.nn.latent_rules``), the
hidden ones trained as point estimates, and the refusal of dropout and batch statistics."""

import copy
import math

import pyro
import pytest
import torch
from bnn_networks import MORE_NETS, batchnorm_eval, data, lstm, mlp
from pyro import poutine
from pyro.infer import SVI, Predictive
from torch import nn

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.nn.bayesian_network import BayesianNetwork


def test_latent_selection_and_hidden_parameters():
    x, y = data(torch.float64, n=20)
    net = mlp(torch.float64)
    assert BayesianNetwork(net, latent="2").latent_sites == ("bnn.2.weight", "bnn.2.bias")
    assert BayesianNetwork(net, latent="*.weight").latent_sites == ("bnn.0.weight",
                                                                    "bnn.2.weight")
    assert BayesianNetwork(net, latent=[nn.Linear]).latent_sites == (
        "bnn.0.weight", "bnn.0.bias", "bnn.2.weight", "bnn.2.bias")
    assert BayesianNetwork(net, latent=lambda n, p: p.dim() == 1).latent_sites == (
        "bnn.0.bias", "bnn.2.bias")
    with pytest.raises(ValueError, match="selects no parameter"):
        BayesianNetwork(net, latent="fc9")
    bnn = BayesianNetwork(net, "classification", latent="2")  # last layer Bayesian
    w0 = net[0].weight.detach().clone()
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    for _ in range(3):
        svi.step(x, y)
    assert guide.latent_dim == 8 * 3 + 3
    assert not torch.equal(bnn.network[0].weight, w0)  # hidden: point estimate, trained
    assert "bnn.0.weight" in pyro.get_param_store()
    frozen = BayesianNetwork(copy.deepcopy(net), latent="2", fit_hidden=False)
    tr = poutine.trace(frozen).get_trace(x, y)
    assert not [n for n, s in tr.nodes.items() if s["type"] == "param" and "0." in n]


def test_dropout_and_batch_statistics_raise_and_eval_mode_trains(default_dtype):
    """Dropout in training mode (a random f) and batch norm with minibatch statistics (rows
    that depend on each other) are refused with the fix; in eval mode they train and predict
    with vectorised particles and parallel Predictive, as do a GRU and an LSTM (no vmap rule;
    Predictive projects on the training data under no_grad)."""
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    dropout.to(default_dtype)
    with pytest.raises(ValueError, match=r"'2' \(Dropout\).*net\.eval\(\)"):
        BayesianNetwork(dropout)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*statistics.*net\.eval\(\)"):
        BayesianNetwork(batchnorm_eval(default_dtype).train())
    no_stats = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False))
    no_stats.to(default_dtype)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        BayesianNetwork(no_stats.eval())
    bnn = BayesianNetwork(dropout.eval())
    dropout.train()  # switched back after building: refused at the next call
    with pytest.raises(ValueError, match="Dropout"):
        bnn(torch.randn(5, 4))
    for make, shape in ((lambda d: dropout.eval(), (4,)), MORE_NETS["batchnorm_eval"],
                        MORE_NETS["gru"], (lstm, (3, 2))):
        pyro.clear_param_store()
        x, y = data(default_dtype, n=40, shape=shape)
        bnn = BayesianNetwork(make(default_dtype), prior_scale="learned", batch_size=10)
        guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
        elbo = TraceViking_ELBO(num_particles=2, vectorize_particles=True)
        svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
        pred = Predictive(bnn, guide=guide, num_samples=4, parallel=True)(x[:5])
        assert pred["logits"].shape == (4, 5, 3)


def test_dropout_with_p_zero_is_deterministic_and_accepted(default_dtype):
    """``Dropout(p=0)`` in training mode is the identity: accepted, as in a transformer layer
    built with ``dropout=0.0`` and left in training mode; it trains and predicts."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 3))
    net.to(default_dtype).train()
    x, y = data(default_dtype, n=20)
    bnn = BayesianNetwork(net, prior_scale="learned")
    torch.testing.assert_close(bnn.forward_network(
        {n: p for n, p in net.named_parameters()}, x), net.eval()(x))
    net.train()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0,
                                                    batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.layer(x.reshape(len(x), 2, 2).repeat(1, 1, 2)).mean(1))

    torch.manual_seed(0)
    encoder = Encoder().to(default_dtype).train()
    bnn = BayesianNetwork(encoder, prior_scale="learned", batch_size=10)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    assert Predictive(bnn, guide=guide, num_samples=3)(x[:5])["logits"].shape == (3, 5, 3)
