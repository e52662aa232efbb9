"""The parameters outside the posterior (``pyro_viking.nn.hidden_parameters``): learned ones are
``pyro.param`` entries started from a copy (the network is never trained in place; ``network``
copies the values in), frozen ones (``requires_grad=False``) and ``fit_hidden=False`` are
constants, and ``param_names`` lists what the model owns in the param store."""

import pyro
import torch
from bnn_networks import data, mlp
from pyro.infer import SVI

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO


def _train(bnn, x, y, steps=3):
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-1}), TraceViking_ELBO())
    for _ in range(steps):  # traced, then fused steps
        svi.step(x, y)


def test_learned_hidden_parameters_train_a_copy(default_dtype):
    x, y = data(default_dtype, n=20)
    net = mlp(default_dtype)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    bnn = BayesianNetwork(net, prior_scale="learned", latent="2")
    _train(bnn, x, y)
    store = pyro.get_param_store()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n  # not trained in place
        assert p.requires_grad
    assert not torch.equal(store["bnn.0.weight"], before["0.weight"])
    assert store["bnn.0.weight"] is not net[0].weight
    assert torch.equal(bnn.network[0].weight, store["bnn.0.weight"])  # copied in when asked
    assert bnn.param_names == ("bnn.prior_scale", "bnn.0.weight", "bnn.0.bias")


def test_frozen_and_unfitted_hidden_parameters_are_constants(default_dtype):
    x, y = data(default_dtype, n=20)
    net = mlp(default_dtype)
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    bnn = BayesianNetwork(net, latent="2")
    _train(bnn, x, y)
    assert torch.equal(bnn.network[0].weight, frozen) and not net[0].weight.requires_grad
    assert "bnn.0.weight" not in pyro.get_param_store()
    assert bnn.param_names == ("bnn.0.bias",)
    pyro.clear_param_store()
    bnn = BayesianNetwork(mlp(default_dtype), "regression", noise_scale="learned", latent="2",
                          fit_hidden=False)
    assert bnn.param_names == ("bnn.noise_scale",)
    assert BayesianNetwork(mlp(default_dtype)).param_names == ()
