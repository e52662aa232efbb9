"""A ``BayesianNetwork`` on a leading batch of weight samples (``pyro_viking.nn.weight_samples``):
vmap, the loop and ``"auto"`` give the values of one call per sample, and ``"auto"`` picks the
loop beyond ``LOOP_OUTPUT_ELEMENTS`` layer outputs or ``LOOP_GRAD_WEIGHTS`` weights with
gradients."""

import math

import pytest
import torch
from bnn_networks import DTYPES, MORE_NETS, TOL, cnn, data, mlp

from pyro_viking.nn import weight_samples as weight_samples_module
from pyro_viking.nn.bayesian_network import BayesianNetwork


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", sorted(MORE_NETS))
@pytest.mark.parametrize("lead", [(4, 1), (4,), (2, 1, 1)])
@pytest.mark.parametrize("weight_samples", ["auto", "vmap", "loop"])
def test_batched_weights_equal_unbatched_calls(dtype, arch, lead, weight_samples):
    """Batched weights (vmap, or a loop where vmap has no batching rule) = one call each."""
    make, shape = MORE_NETS[arch]
    bnn = BayesianNetwork(make(dtype), "classification", prior_scale=1.0,
                          weight_samples=weight_samples)
    x, _ = data(dtype, n=5, shape=shape)
    torch.manual_seed(2)
    W = {n: torch.randn(lead + s, dtype=dtype) for n, s in bnn.latent_shapes.items()}
    out = bnn.forward_network(W, x)
    K = math.prod(lead)
    assert out.shape == (lead[:-1] if lead[-1] == 1 else lead) + (5, 3)
    flat = out.reshape(K, 5, 3)
    for k in range(K):
        one = {n: w.reshape((K,) + w.shape[len(lead):])[k] for n, w in W.items()}
        assert torch.allclose(flat[k], bnn.forward_network(one, x), atol=TOL[dtype])


def test_auto_weight_samples_loop_for_large_layer_outputs(monkeypatch, default_dtype):
    """``weight_samples="auto"`` on CPU: vmap while one sample's ``nn.Linear`` and convolution
    outputs stay within LOOP_OUTPUT_ELEMENTS, a loop beyond (decided once per input shape), with
    or without gradients; the outputs do not depend on the choice."""
    calls = []
    vmap = torch.vmap
    monkeypatch.setattr(torch, "vmap", lambda *a, **k: calls.append(1) or vmap(*a, **k))
    # per input: mlp 8 + 3 Linear outputs; cnn 3·4·4 convolution + 3 Linear outputs
    monkeypatch.setattr(weight_samples_module, "LOOP_OUTPUT_ELEMENTS", 51 * 5)
    for make, shape, n, vmapped in ((mlp, (4,), 23, True), (mlp, (4,), 24, False),
                                    (cnn, (1, 4, 4), 5, True), (cnn, (1, 4, 4), 6, False)):
        for grad in (False, True):
            bnn = BayesianNetwork(make(default_dtype), prior_scale=1.0)
            x, _ = data(default_dtype, n=n, shape=shape)
            W = {k: torch.randn((3,) + s, dtype=default_dtype).requires_grad_(grad)
                 for k, s in bnn.latent_shapes.items()}
            calls.clear()
            out = [bnn.forward_network(W, x) for _ in range(2)][0]
            assert len(calls) == (2 if vmapped else 0), (make.__name__, n, grad)
            ref = BayesianNetwork(make(default_dtype), prior_scale=1.0, weight_samples="loop")
            torch.testing.assert_close(out, ref.forward_network(W, x))


def test_auto_weight_samples_loop_for_many_weights_with_gradients(monkeypatch, default_dtype):
    """``weight_samples="auto"`` on CPU: weights that need gradients and number more than
    LOOP_GRAD_WEIGHTS per sample run in a loop, fewer or without gradients through vmap; the
    values and the gradients do not depend on the choice."""
    calls = []
    vmap = torch.vmap
    monkeypatch.setattr(torch, "vmap", lambda *a, **k: calls.append(1) or vmap(*a, **k))
    bnn = BayesianNetwork(mlp(default_dtype), prior_scale=1.0)
    ref = BayesianNetwork(mlp(default_dtype), prior_scale=1.0, weight_samples="loop")
    D = sum(math.prod(s) for s in bnn.latent_shapes.values())
    x, _ = data(default_dtype, n=7, shape=(4,))
    for limit, grad, vmapped in ((D - 1, True, False), (D, True, True), (D - 1, False, True)):
        monkeypatch.setattr(weight_samples_module, "LOOP_GRAD_WEIGHTS", limit)
        W = {k: torch.randn((3,) + s, dtype=default_dtype).requires_grad_(grad)
             for k, s in bnn.latent_shapes.items()}
        calls.clear()
        out = bnn.forward_network(W, x)
        assert len(calls) == (1 if vmapped else 0), (limit, grad)
        expected = ref.forward_network(W, x)
        torch.testing.assert_close(out, expected)
        if grad:
            u = torch.randn_like(out)
            got = torch.autograd.grad(out, list(W.values()), u)
            want = torch.autograd.grad(expected, list(W.values()), u)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)


def test_tied_weights_are_untied_by_the_network_call():
    """``functional_call`` skips untying for networks without tied tensors (the common case);
    a network whose two layers share one weight still runs both on the value given for it."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(3, 3, bias=False))
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(3, 3, bias=False))
    tied[2].weight = tied[0].weight
    assert not weight_samples_module.has_tied_tensors(plain)
    assert weight_samples_module.has_tied_tensors(tied)
    bnn = BayesianNetwork(tied, "regression")
    assert bnn._weight_samples.tied and list(bnn.latent_shapes) == ["0.weight"]
    W, x = torch.randn(3, 3), torch.randn(5, 3)
    out = bnn.forward_network({"0.weight": W}, x)
    torch.testing.assert_close(out, torch.tanh(x @ W.T) @ W.T)
