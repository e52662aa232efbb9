"""VIKING on part of a trained network (``docs/partial_latents.md``): the last layers
(``latent=`` with the rest frozen) and low-rank adapters added to a frozen network
(``pyro_viking.nn.lora``). The latent vector is the chosen subset, the frozen parameters never
change, and the guide's projection uses the Jacobian w.r.t. the subset only (dense check)."""

import copy

import pyro
import pytest
import torch
from bnn_networks import data, transformer
from torch import nn
from torch.func import functional_call

from pyro_viking import AutoViking, BayesianNetwork, fit_viking
from pyro_viking.infer.autoguide.projector_choice import build_projector
from pyro_viking.nn.lora import LORA_LATENT, LoRALinear, add_lora, lora_size

LAST = ["norm", "head"]
ADAPTED = ["layer.linear1", "layer.linear2", "head"]


def _fit(bnn, x, y):
    return fit_viking(bnn, x, y, num_steps=4, warmup_steps=4, curvature_batches=1,
                      optim=pyro.optim.Adam({"lr": 1e-2}), progress=False)


def _numel(net, names):
    params = dict(net.named_parameters())
    return sum(params[n].numel() for n in names)


def test_last_layers_of_a_trained_network(default_dtype):
    """``latent=["norm", "head"]``, ``fit_hidden=False``: D is the two layers' size, every other
    parameter is a constant of the model (no ``pyro.param``) and unchanged by the fit."""
    x, y = data(default_dtype, n=24, shape=(3, 2))
    net = transformer(default_dtype)
    before = copy.deepcopy(net.state_dict())
    bnn = BayesianNetwork(net, "classification", latent=LAST, fit_hidden=False, batch_size=8,
                          prior_scale="learned")
    fit = _fit(bnn, x, y)
    names = [n for n, _ in net.named_parameters() if n.startswith(tuple(LAST))]
    assert fit.guide.latent_dim == _numel(net, names) == 8 + 8 + 3 * 8 + 3
    assert fit.guide.backend_used == "layer_gram"
    assert not [n for n in pyro.get_param_store() if n.startswith("bnn.layer")]
    for n, v in bnn.network.state_dict().items():  # the frozen ones, and the net's own
        if not n.startswith(tuple(LAST)):
            assert torch.equal(v, before[n]), n
    assert all(torch.equal(v, before[n]) for n, v in net.state_dict().items())
    assert not torch.equal(fit.guide.median()["bnn.head.weight"], before["head.weight"])


def test_lora_adapters_on_a_frozen_network(default_dtype):
    """``add_lora`` copies and freezes the network; with ``latent=LORA_LATENT`` the adapters are
    the latents (``Σ r (in + out)``), the copy starts as the network, the base never moves."""
    x, y = data(default_dtype, n=24, shape=(3, 2))
    net = transformer(default_dtype)
    lora_net = add_lora(net, ADAPTED, rank=2)
    assert isinstance(lora_net.head, LoRALinear) and isinstance(net.head, nn.Linear)
    torch.testing.assert_close(lora_net(x), net(x))  # B = 0: the same function
    base = {n: p.detach().clone() for n, p in lora_net.named_parameters() if "lora_" not in n}
    assert not any(lora_net.get_parameter(n).requires_grad for n in base)
    bnn = BayesianNetwork(lora_net, "classification", latent=LORA_LATENT, batch_size=8,
                          prior_scale="learned")
    fit = _fit(bnn, x, y)
    assert fit.guide.latent_dim == lora_size(lora_net) == 2 * ((8 + 16) + (16 + 8) + (8 + 3))
    assert fit.guide.backend_used == "layer_gram"
    assert bnn.param_names == ("bnn.prior_scale",)  # frozen: constants, not point estimates
    for n, v in base.items():
        assert torch.equal(bnn.network.get_parameter(n), v), n
    assert fit.guide.median()["bnn.head.lora_b.weight"].abs().max() > 0  # the adapters moved


@pytest.mark.float64_only
@pytest.mark.parametrize("how", ["last_layers", "lora"])
def test_projection_uses_the_jacobian_of_the_subset(how):
    """The guide's Jacobian (``build_projector``, as a training step builds it) equals the dense
    Jacobian of the per-datum log-likelihoods w.r.t. the chosen parameters only (1e-8), and its
    projection annihilates it: ``J P v = 0``."""
    x, y = data(torch.float64, n=10, shape=(3, 2))
    net = transformer(torch.float64)
    if how == "lora":
        net = add_lora(net, ADAPTED, rank=2)
        with torch.no_grad():  # B ≠ 0, or the Jacobian w.r.t. A vanishes
            for n, p in net.named_parameters():
                if "lora_b" in n:
                    p.normal_(0, 0.3)
        bnn = BayesianNetwork(net, "classification", latent=LORA_LATENT)
    else:
        bnn = BayesianNetwork(net, "classification", latent=LAST, fit_hidden=False)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    guide(x, y)
    names = [s[len("bnn."):] for s in guide.layout.names]
    shapes = [net.get_parameter(n).shape for n in names]
    loc = guide.loc.detach()

    def rows(z):
        params, o = {}, 0
        for n, s in zip(names, shapes):
            params[n] = z[o:o + s.numel()].view(s)
            o += s.numel()
        return torch.distributions.Categorical(
            logits=functional_call(net, params, (x,))).log_prob(y)

    J = torch.func.jacrev(rows)(loc).detach()
    assert J.shape == (10, _numel(net, names)) == (10, guide.latent_dim)
    proj = build_projector(bnn, guide.layout, (x, y), {}, loc)
    assert proj.operator.backend_name == "layer_gram"
    tol = 1e-8 * float(J.abs().max())
    torch.testing.assert_close(proj.operator.to_dense(), J, atol=tol, rtol=0)
    V = torch.randn(3, guide.latent_dim)
    assert float((proj(V) @ J.T).abs().max()) < 1e-8 * float((V @ J.T).abs().max())


def test_lora_targets_are_checked(default_dtype):
    net = transformer(default_dtype)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        add_lora(net, "layer.self_attn.out_proj")
    with pytest.raises(ValueError, match="rank"):
        add_lora(net, "head", rank=0)
    every = add_lora(net, nn.Linear, rank=1)  # every Linear called as a module
    adapted = {n for n, m in every.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"inp", "layer.linear1", "layer.linear2", "head"}
    assert all(p.requires_grad for p in net.parameters())  # the original is untouched
