"""``network_output``: a network's output under given parameters, or its linearisation."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from pyro_viking import network_output


@pytest.mark.float64_only
def test_network_output_and_its_linearisation_match_dense_references():
    """``network_output``: the plain output equals the module's; the linearised one equals
    ``f(θ_ref) + J (θ − θ_ref)`` with a dense ``jacrev`` Jacobian, and ``f(θ_ref)`` at θ_ref."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    ref = {n: p.detach() for n, p in net.named_parameters()}
    theta = {n: p + 0.3 * torch.randn_like(p) for n, p in ref.items()}
    torch.testing.assert_close(network_output(net, theta, x), functional_call(net, theta, (x,)))
    J = jacrev(lambda p: functional_call(net, p, (x,)))(ref)
    lin = functional_call(net, ref, (x,)) + sum(
        (J[n].reshape(5, 2, -1) @ (theta[n] - ref[n]).reshape(-1)) for n in ref)
    torch.testing.assert_close(network_output(net, theta, x, linearise_at=ref), lin,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(network_output(net, ref, x, linearise_at=ref),
                               functional_call(net, ref, (x,)))


@pytest.mark.float64_only
def test_linearisation_in_some_parameters_holds_the_others_at_their_given_values():
    """``linearise_at`` naming some parameters: the network is linearised in those only, the
    others held at their ``params`` values (not the module's own), as ``BayesianNetwork`` does
    for its latent and hidden parameters."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    params = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in net.named_parameters()}
    ref = {n: params[n] + 0.1 * torch.randn_like(params[n]) for n in ("0.weight", "0.bias")}
    J = jacrev(lambda p: functional_call(net, {**params, **p}, (x,)))(ref)  # (5, 2, *shape)
    lin = functional_call(net, {**params, **ref}, (x,)) + sum(
        (J[n].reshape(5, 2, -1) @ (params[n] - ref[n]).reshape(-1)) for n in ref)
    torch.testing.assert_close(network_output(net, params, x, linearise_at=ref), lin,
                               rtol=1e-10, atol=1e-12)
