"""``bnn.linearised(guide)`` / ``linearised_model``: the Pyro model whose network output is
``f(x; θ̂) + J_f(x; θ̂)(θ − θ̂)``, ``θ̂ = guide.median()``, so that ``Predictive`` gives the
linearised (GLM) predictive. References in float64: the network itself at ``θ = θ̂``, a network
linear in its weights, and ``f(θ̂) + J (θ − θ̂)`` with a dense ``jacrev`` Jacobian per sample."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive
from torch import nn
from torch.func import functional_call, jacrev

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.nn import linearised_model

N = 20


def _trained(net, likelihood="classification", steps=5):
    torch.manual_seed(0)
    bnn = BayesianNetwork(net, likelihood, prior_scale=0.5)
    x = torch.randn(N, 3)
    y = torch.randint(0, 3, (N,)) if likelihood == "classification" else torch.randn(N)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return bnn, guide, x


def _mlp(out=3):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, out))


def _predict(model, guide, x, site, parallel, num_samples=6):
    pyro.set_rng_seed(3)
    return Predictive(model, guide=guide, num_samples=num_samples, parallel=parallel,
                      return_sites=[site, *guide.layout.names])(x)


def _replay(model, pred, x, site, parallel):
    """``model``'s ``site`` under the latent samples of ``pred`` (a ``Predictive`` output)."""
    samples = {k: v for k, v in pred.items() if k != site}
    return Predictive(model, posterior_samples=samples, parallel=parallel,
                      return_sites=[site])(x)


def _hand_linearisation(bnn, guide, x, samples):
    """``f(θ̂) + J_f(θ̂) (θ_s − θ̂)`` per sample ``s``, ``J_f`` a dense ``jacrev`` Jacobian."""
    at = guide.median()
    names = list(bnn.latent_shapes)

    def f(*values):
        return functional_call(bnn.net, dict(zip(names, values)), (x,))

    ref = [at[bnn.site_name(n)] for n in names]
    Js = jacrev(f, argnums=tuple(range(len(names))))(*ref)  # each (B, O, *shape)
    S = samples[bnn.site_name(names[0])].shape[0]
    out = []
    for s in range(S):
        step = [samples[bnn.site_name(n)][s].reshape(r.shape) - r for n, r in zip(names, ref)]
        out.append(f(*ref) + sum(J.flatten(2) @ d.reshape(-1) for J, d in zip(Js, step)))
    return torch.stack(out)


@pytest.mark.float64_only
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_samples_logits_are_the_hand_computed_linearisation(default_dtype, parallel, likelihood):
    bnn, guide, x = _trained(_mlp(3 if likelihood == "classification" else 1), likelihood)
    site = bnn.output_site
    pred = _predict(bnn.linearised(guide), guide, x[:7], site, parallel)
    ref = _hand_linearisation(bnn, guide, x[:7], pred)
    torch.testing.assert_close(pred[site], ref, rtol=1e-10, atol=1e-10)
    plain = _replay(bnn, pred, x[:7], site, parallel)  # the same samples, not linearised
    assert (plain[site] - pred[site]).abs().max() > 1e-6  # tanh: the two differ


@pytest.mark.float64_only
def test_linearised_model_at_its_reference_point_is_the_network(default_dtype):
    """Conditioned on ``θ = θ̂`` the linearised model's output and log-likelihood are the
    network's (the step ``θ − θ̂`` is zero)."""
    bnn, guide, x = _trained(_mlp())
    at = guide.median()
    y = torch.randint(0, 3, (N,))
    traces = [poutine.trace(poutine.condition(m, data=at)).get_trace(x, y)
              for m in (bnn, bnn.linearised(guide))]
    torch.testing.assert_close(traces[1].nodes["logits"]["value"],
                               traces[0].nodes["logits"]["value"], rtol=0, atol=1e-14)
    torch.testing.assert_close(traces[1].log_prob_sum(), traces[0].log_prob_sum())


@pytest.mark.float64_only
@pytest.mark.parametrize("parallel", [False, True])
def test_linearised_model_is_exact_for_a_network_linear_in_its_weights(default_dtype, parallel):
    bnn, guide, x = _trained(nn.Linear(3, 3))
    lin = _predict(bnn.linearised(guide), guide, x, "logits", parallel)
    plain = _replay(bnn, lin, x, "logits", parallel)
    torch.testing.assert_close(lin["logits"], plain["logits"], rtol=1e-12, atol=1e-12)


def test_linearised_model_predicts_in_the_default_dtype(default_dtype):
    """float32 and float64: ``Predictive`` with the guide gives finite outputs and labels of
    the model's shapes; ``bnn.linearised`` is ``linearised_model``; a guide trained further is
    followed (``θ̂`` is read at every call)."""
    bnn, guide, x = _trained(_mlp())
    model = linearised_model(bnn, guide)
    pred = Predictive(model, guide=guide, num_samples=4, return_sites=["logits", "obs"])(x[:5])
    assert pred["logits"].shape == (4, 5, 3) and pred["logits"].isfinite().all()
    assert pred["obs"].shape == (4, 5)
    before = model(x[:5])  # prior draw of θ, with the same seed below
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-1}), TraceViking_ELBO())
    svi.step(x, torch.randint(0, 3, (N,)))
    pyro.set_rng_seed(0)
    a = model(x[:5])
    pyro.set_rng_seed(0)
    b = bnn(x[:5], linearise_at=guide.median())
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, before)


def test_reference_as_a_dict_or_a_callable_and_the_errors(default_dtype):
    bnn, guide, x = _trained(_mlp())
    at = guide.median()
    pyro.set_rng_seed(0)
    ref = bnn(x, linearise_at=at)
    for reference in (at, lambda: at):
        pyro.set_rng_seed(0)
        torch.testing.assert_close(bnn.linearised(reference)(x), ref)
    with pytest.raises(ValueError, match="no reference value for the latent sites"):
        bnn.linearised({})(x)
    with pytest.raises(TypeError, match="needs a guide"):
        bnn.linearised(3.0)(x)
    with pytest.raises(RuntimeError, match="not set up yet"):
        bnn.linearised(AutoViking(bnn))(x)
