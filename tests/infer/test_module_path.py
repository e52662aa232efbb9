"""VIKING as a PyTorch module (pyro_viking.infer.module, pyro_viking.nn.scales).

``TraceViking_ELBO(beta)(bnn, guide)`` with ``module_local_params`` on, trained by one
``torch.optim.Adam`` over its parameters, takes the steps ``SVI`` takes with ``pyro.optim.Adam``
(same seed: the same minibatches and noise): the same loss at every step and the same value of
every parameter after 20 steps, in float64 to 1e-10. ``SVI`` takes Pyro's traced step first and
the fused step after; the module path evaluates ``differentiable_loss``."""

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer.module import check_module_local, setup_parameters
from pyro_viking.nn.scales import learned_value

STEPS = 20
LR = 1e-2

CASES = {
    "classification, learned prior scale": (
        "classification", dict(prior_scale="learned", batch_size=16), {}),
    "regression, learned noise and kernel scales": (
        "regression", dict(prior_scale=0.5, noise_scale="learned", batch_size=16),
        dict(kernel_scale="learned")),
    "regression, minibatches with num_data, learned prior and noise": (
        "regression", dict(prior_scale="learned", noise_scale="learned", num_data=60), {}),
    "classification, last layer latent, hidden first layer": (
        "classification", dict(prior_scale="learned", latent="2", batch_size=16), {}),
}


def _data(likelihood, n=60):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    if likelihood == "classification":
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    else:
        y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g)
    return x, y


def _build(case):
    likelihood, bnn_options, guide_options = CASES[case]
    pyro.set_rng_seed(3)
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 1
    net = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, out))
    bnn = BayesianNetwork(net, likelihood, **bnn_options)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=0.05,
                       **guide_options)
    return bnn, guide, _data(likelihood)


def _calls(bnn, x, y):
    for step in range(STEPS):
        if bnn.num_data is not None:  # a loader's minibatch of 15
            i = torch.arange(15 * step, 15 * step + 15) % len(x)
            yield x[i], y[i]
        else:
            yield x, y


def _train_svi(case):
    bnn, guide, (x, y) = _build(case)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": LR}), TraceViking_ELBO(beta=0.1))
    losses = [svi.step(*args) for args in _calls(bnn, x, y)]
    store = pyro.get_param_store()
    return losses, {name: store[name].detach().clone() for name in store}


def _module_values(bnn, guide):
    """Every learned parameter of the module path, constrained, by its Pyro name."""
    values = {f"{guide._pyro_name}.{name}": getattr(guide, name).detach().clone()
              for name in guide._pyro_params}
    for name in bnn.local_params.constraints:
        values[name] = learned_value(bnn, name).detach().clone()
    return values


def _train_module(case, setup=False):
    with pyro.settings.context(module_local_params=True):
        bnn, guide, (x, y) = _build(case)
        elbo = TraceViking_ELBO(beta=0.1)(bnn, guide)
        optimizer, losses = None, []
        if setup:  # the parameters first, then the optimiser
            setup_parameters(elbo, *next(_calls(bnn, x, y)))
            optimizer = torch.optim.Adam(elbo.parameters(), lr=LR)
        for args in _calls(bnn, x, y):
            loss = elbo(*args)
            loss.backward()
            if optimizer is None:  # the first call created the parameters
                optimizer = torch.optim.Adam(elbo.parameters(), lr=LR)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        assert len(pyro.get_param_store()) == 0  # nothing in the global store
        return losses, _module_values(bnn, guide)


@pytest.mark.float64_only
@pytest.mark.parametrize("case", list(CASES))
def test_module_path_takes_the_steps_of_svi(case, default_dtype):
    svi_losses, svi_params = _train_svi(case)
    pyro.clear_param_store()
    module_losses, module_params = _train_module(case)
    assert module_losses == pytest.approx(svi_losses, rel=1e-10, abs=1e-10)
    assert module_params.keys() == svi_params.keys()
    for name, value in svi_params.items():
        torch.testing.assert_close(module_params[name], value, rtol=1e-10, atol=1e-10,
                                   msg=name)
    assert svi_params["AutoViking.image_scale"] != pytest.approx(0.05)  # it did train


@pytest.mark.float64_only
def test_set_up_first_then_the_steps_of_svi(default_dtype):
    """``setup_parameters`` before the optimiser: the same steps (the tied learned prior scale
    still trains σ_ker: the set-up call runs with gradients). The model draws no minibatch (a
    loader's batches with ``num_data``): the set-up then draws nothing that ``SVI``'s first
    step draws, and restores what it draws."""
    case = "regression, minibatches with num_data, learned prior and noise"
    svi_losses, svi_params = _train_svi(case)
    pyro.clear_param_store()
    module_losses, module_params = _train_module(case, setup=True)
    assert module_losses == pytest.approx(svi_losses, rel=1e-10, abs=1e-10)
    for name, value in svi_params.items():
        torch.testing.assert_close(module_params[name], value, rtol=1e-10, atol=1e-10,
                                   msg=name)
    assert svi_params["bnn.prior_scale"] != pytest.approx(0.1)


def test_every_viking_parameter_is_a_module_parameter():
    with pyro.settings.context(module_local_params=True):
        bnn, guide, (x, y) = _build("regression, learned noise and kernel scales")
        bnn.prior_scale = None  # learned prior scale too (kernel scale: learned, not tied)
        elbo = setup_parameters(TraceViking_ELBO()(bnn, guide), x, y)
        names = {name for name, _ in elbo.named_parameters()}
        assert {"guide.loc_unconstrained", "guide.image_scale_unconstrained",
                "guide.kernel_scale_unconstrained_unconstrained",
                "model.local_params.bnn/prior_scale",
                "model.local_params.bnn/noise_scale"} <= names
        assert not names - {f"model.net.{n}" for n, _ in bnn.net.named_parameters()} \
            - {"guide.loc_unconstrained", "guide.image_scale_unconstrained",
               "guide.kernel_scale_unconstrained_unconstrained",
               "model.local_params.bnn/prior_scale", "model.local_params.bnn/noise_scale"}
        elbo(x, y).backward()
        trained = {name for name, p in elbo.named_parameters() if p.grad is not None}
        assert trained == names - {f"model.net.{n}" for n, _ in bnn.net.named_parameters()}
        assert len(pyro.get_param_store()) == 0


def test_setup_parameters_takes_no_step_and_draws_nothing():
    with pyro.settings.context(module_local_params=True):
        bnn, guide, (x, y) = _build("classification, learned prior scale")
        elbo = TraceViking_ELBO()(bnn, guide)
        state = torch.random.get_rng_state()
        setup_parameters(elbo, x, y)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert all(p.grad is None for p in elbo.parameters())
        assert guide.prototype_trace is not None and "bnn.prior_scale" in bnn.local_params
        assert float(learned_value(bnn, "bnn.prior_scale").detach()) == pytest.approx(0.1)


def test_module_path_refuses_the_global_store_with_the_fix():
    bnn, guide, (x, y) = _build("classification, learned prior scale")
    elbo = TraceViking_ELBO()(bnn, guide)
    with pytest.raises(RuntimeError, match="module_local_params=True"):
        setup_parameters(elbo, x, y)
    with pyro.settings.context(module_local_params=True):  # the guide was built without it
        with pytest.raises(RuntimeError, match="built while module_local_params was off"):
            check_module_local(elbo)


def test_learned_scales_unchanged_when_module_local_params_is_off():
    bnn, guide, (x, y) = _build("regression, minibatches with num_data, learned prior and noise")
    SVI(bnn, guide, pyro.optim.Adam({"lr": LR}), TraceViking_ELBO()).step(x[:15], y[:15])
    store = pyro.get_param_store()
    assert {"bnn.prior_scale", "bnn.noise_scale"} <= set(store.keys())
    assert "local_params" not in bnn._modules
    assert learned_value(bnn, "bnn.noise_scale") is not None
    torch.testing.assert_close(learned_value(bnn, "bnn.noise_scale"), store["bnn.noise_scale"])
    assert learned_value(bnn, "bnn.absent") is None
