"""The recipe keeps no hidden state: a fit starts from what its arguments say (the network's
weights are copied, never trained in place; the param store entries a fit owns are reset), so
two fits in one process equal two fits in fresh processes, and ``select_beta``'s candidates are
independent of their order. Each test runs in float32 and float64."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

from pyro_viking import BayesianNetwork, fit_viking, select_beta
from pyro_viking.infer.recipe import fit as recipe_fit
from pyro_viking.infer.recipe.beta_selection import validation_nll
from pyro_viking.infer.recipe.fit import default_warmup_steps

ROOT = Path(__file__).resolve().parents[3]


def _data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _net(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, out))


def _fit(bnn, x, y, beta, seed=0, **options):
    pyro.set_rng_seed(seed)
    options = {"num_steps": 30, "warmup_steps": 30, "progress": False,
               "optim": pyro.optim.Adam({"lr": 1e-2}), **options}
    return fit_viking(bnn, x, y, beta=beta, **options)


def _state(fit):
    g = fit.guide
    return (g.loc.detach().clone(), float(g.image_scale), float(g.kernel_scale),
            dict(fit.init))


def _assert_same(a, b, rtol):
    assert torch.allclose(a[0], b[0], rtol=rtol, atol=rtol), (a[0] - b[0]).abs().max()
    for u, v in zip(a[1:3], b[1:3]):
        assert u == pytest.approx(v, rel=rtol)
    for k in a[3]:
        assert a[3][k] == pytest.approx(b[3][k], rel=rtol, nan_ok=True)


@pytest.mark.parametrize("hidden", [False, True], ids=["all latent", "hidden first layer"])
def test_a_second_fit_in_one_process_equals_a_fresh_fit(default_dtype, hidden):
    """After a fit with another β (and its param store left in place), a fit under the same seed
    gives what it gives on a clean store with a fresh copy of the network: the guide's loc,
    σ_im, σ_ker and the curvature start."""
    x, y = _data()
    net = _net()
    options = {"prior_scale": "learned", "batch_size": 16}
    if hidden:
        options["latent"] = "2.*"
    pristine = copy.deepcopy(net)
    first = BayesianNetwork(net, **options)
    _fit(first, x, y, beta=0.1)
    again = _state(_fit(BayesianNetwork(net, **options), x, y, beta=0.001))
    pyro.clear_param_store()
    fresh = _state(_fit(BayesianNetwork(pristine, **options), x, y, beta=0.001))
    _assert_same(again, fresh, rtol=1e-6)
    for (n, p), q in zip(net.named_parameters(), pristine.parameters()):
        assert torch.equal(p, q), f"the fit trained the network's own {n} in place"


def test_an_interrupted_fit_leaves_nothing_behind(default_dtype):
    """A fit stopped mid-way (an exception from the data, as a KeyboardInterrupt would) does not
    change the next fit: it equals a fit on a clean store."""
    x, y = _data()
    net = _net()
    options = {"prior_scale": "learned", "batch_size": 16}

    def interrupted():
        for step, batch in enumerate(iter(lambda: (x, y), None)):
            if step == 12:
                raise KeyboardInterrupt
            yield batch

    bnn = BayesianNetwork(net, num_data=60, prior_scale="learned")
    with pytest.raises(KeyboardInterrupt):
        pyro.set_rng_seed(0)
        fit_viking(bnn, batches=_Reiterable(interrupted), num_steps=30, warmup_steps=5,
                   progress=False)
    again = _state(_fit(BayesianNetwork(net, **options), x, y, beta=0.01))
    pyro.clear_param_store()
    fresh = _state(_fit(BayesianNetwork(copy.deepcopy(net), **options), x, y, beta=0.01))
    _assert_same(again, fresh, rtol=1e-6)


class _Reiterable:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


@pytest.mark.dtype_independent
def test_two_fits_in_one_process_equal_two_fresh_processes(tmp_path, default_dtype):
    """The acceptance check itself: fits with β = 0.1 then β = 0.001 in one Python process give
    the same guide as each fit alone in a new process (same seeds)."""
    script = f"""
import sys, torch, pyro
sys.path.insert(0, {str(ROOT)!r})
from torch import nn
from pyro_viking import BayesianNetwork, fit_viking
g = torch.Generator().manual_seed(1)
x = torch.randn(60, 4, generator=g)
y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3))
out = {{}}
for beta in [float(b) for b in sys.argv[2:]]:
    pyro.set_rng_seed(0)
    fit = fit_viking(BayesianNetwork(net, prior_scale="learned", batch_size=16), x, y,
                     beta=beta, num_steps=30, warmup_steps=30, progress=False,
                     optim=pyro.optim.Adam({{"lr": 1e-2}}))
    out[beta] = (fit.guide.loc.detach().clone(), float(fit.guide.image_scale))
torch.save(out, sys.argv[1])
"""
    path = tmp_path / "fit.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(name, *betas):
        subprocess.run([sys.executable, str(path), str(tmp_path / name), *betas], check=True,
                       env=env, timeout=300)
        return torch.load(tmp_path / name)

    both = run("both.pt", "0.1", "0.001")
    alone = {0.1: run("a.pt", "0.1")[0.1], 0.001: run("b.pt", "0.001")[0.001]}
    for beta in (0.1, 0.001):
        assert torch.equal(both[beta][0], alone[beta][0])
        assert both[beta][1] == alone[beta][1]


def test_select_beta_does_not_depend_on_the_order_of_betas(default_dtype):
    """Each candidate starts from the same state (weights, store, random numbers): the table is
    the same for a permutation of ``betas``, and the chosen fit is what a fit of that β alone
    gives."""
    x, y = _data()
    xv, yv = _data(40, seed=2)
    net = _net()

    def run(betas):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        bnn = BayesianNetwork(copy.deepcopy(net), prior_scale="learned", batch_size=16)
        return select_beta(bnn, x, y, validation=(xv, yv), betas=betas, num_steps=20,
                           warmup_steps=20, num_samples=8, progress=False, recipes=("elbo",),
                           optim_factory=lambda: pyro.optim.Adam({"lr": 1e-2}))

    a, b = run((0.1, 0.001)), run((0.001, 0.1))
    rows_a = {r["beta"]: r for r in a.table}
    rows_b = {r["beta"]: r for r in b.table}
    for beta in (0.1, 0.001):
        for key in ("val_nll", "image_scale", "kernel_scale", "prior_scale"):
            assert rows_a[beta][key] == pytest.approx(rows_b[beta][key], rel=1e-6), (beta, key)
    assert a.beta == b.beta
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    alone = select_beta(BayesianNetwork(copy.deepcopy(net), prior_scale="learned",
                                        batch_size=16),
                        x, y, validation=(xv, yv), betas=(a.beta,), num_steps=20,
                        warmup_steps=20, num_samples=8, progress=False, recipes=("elbo",),
                        optim_factory=lambda: pyro.optim.Adam({"lr": 1e-2}))
    assert alone.table[0]["val_nll"] == pytest.approx(rows_a[a.beta]["val_nll"], rel=1e-6)
    # the store holds the chosen fit's parameters on return
    assert torch.equal(a.fit.guide.loc.detach(), pyro.param("AutoViking.loc").detach()) \
        if "AutoViking.loc" in pyro.get_param_store() else True


def test_select_beta_refuses_empty_candidates_and_scores_zero_elbo_steps(default_dtype):
    """No candidates is an error naming ``betas``; ``num_steps=0`` (post-hoc candidates) scores
    every candidate instead of failing on an empty history."""
    x, y = _data()
    xv, yv = _data(40, seed=2)
    bnn = BayesianNetwork(_net(), prior_scale="learned", batch_size=16)
    with pytest.raises(ValueError, match="betas"):
        select_beta(bnn, x, y, validation=(xv, yv), betas=(), progress=False)
    with pytest.raises(ValueError, match="recipes"):
        select_beta(bnn, x, y, validation=(xv, yv), recipes=("laplace",), progress=False)
    result = select_beta(bnn, x, y, validation=(xv, yv), betas=(0.1, 0.01), num_steps=0,
                         warmup_steps=20, num_samples=4, progress=False, recipes=("elbo",))
    assert len(result.table) == 2
    for row in result.table:
        assert torch.isfinite(torch.tensor(row["val_nll"]))
        assert row["image_scale"] > 0 and row["kernel_scale"] > 0


def test_select_beta_post_hoc_candidate_is_the_map_of_the_whole_budget(default_dtype):
    """A ``"post-hoc"`` candidate of ``select_beta`` is ``fit_viking(num_steps=0)`` after a MAP
    of ``warmup_steps + num_steps`` steps (the same examples as the ``"elbo"`` candidate):
    the same validation NLL and scales as that fit made by hand with the same seed."""
    x, y = _data()
    xv, yv = _data(40, seed=2)
    net = _net()

    def bnn():
        return BayesianNetwork(copy.deepcopy(net), prior_scale="learned", batch_size=16)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    result = select_beta(bnn(), x, y, validation=(xv, yv), betas=(0.1,), num_steps=15,
                         warmup_steps=10, num_samples=8, progress=False,
                         recipes=("post-hoc",),
                         optim_factory=lambda: pyro.optim.Adam({"lr": 1e-2}))
    assert result.recipe == "post-hoc" and result.fit.history["phase"].count("map") == 25
    assert result.fit.history["phase"].count("elbo") == 0
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = bnn()
    fit = fit_viking(model, x, y, num_steps=0, warmup_steps=25, beta=0.1, progress=False,
                     optim=pyro.optim.Adam({"lr": 1e-2}))
    fit.guide.project_training_data(x, y, num_samples=8)
    nll = validation_nll(model, fit.guide, xv, yv, num_samples=8)
    assert result.table[0]["val_nll"] == pytest.approx(float(nll.mean()), rel=1e-6)
    assert result.table[0]["image_scale"] == pytest.approx(
        float(fit.guide.image_scale.detach()), rel=1e-6)


def test_select_beta_candidates_share_fit_vikings_warm_up_default(default_dtype, monkeypatch):
    """Without ``warmup_steps`` both recipes take ``fit_viking``'s default warm-up
    (``default_warmup_steps``), the post-hoc one then ``num_steps`` more MAP steps: with
    ``num_steps=0`` both are a MAP of ``POST_HOC_WARMUP_STEPS`` steps, not one of none."""
    assert default_warmup_steps(40) == 10 and default_warmup_steps(40, 3) == 3
    monkeypatch.setattr(recipe_fit, "POST_HOC_WARMUP_STEPS", 6)
    assert default_warmup_steps(0) == 6
    x, y = _data()
    xv, yv = _data(40, seed=2)
    fits = {}
    for recipe in ("elbo", "post-hoc"):
        pyro.clear_param_store()
        fits[recipe] = select_beta(
            BayesianNetwork(_net(), prior_scale="learned", batch_size=16), x, y,
            validation=(xv, yv), betas=(0.1,), num_steps=0, num_samples=4, progress=False,
            recipes=(recipe,)).fit
    for fit in fits.values():
        assert fit.history["phase"].count("map") == 6


def test_the_post_hoc_recipe_trains_its_map(default_dtype):
    """``fit_viking(bnn, x, y, num_steps=0)`` (the posterior at a MAP) runs a MAP warm-up by
    default: the posterior mean classifies the training data as a MAP does, not as the random
    initial network does."""
    x, y = _data()
    bnn = BayesianNetwork(_net(), prior_scale="learned")
    fit = fit_viking(bnn, x, y, num_steps=0, progress=False, optim=pyro.optim.Adam({"lr": 1e-2}))
    assert fit.history["phase"].count("map") > 0
    logits = bnn.forward_network(
        {n: fit.map_values[bnn.site_name(n)] for n in bnn.latent_shapes}, x)
    assert (logits.argmax(-1) == y).double().mean() > 0.9


@pytest.mark.parametrize("bad", [{"num_steps": -1}, {"warmup_steps": -3},
                                 {"num_steps": 2.5}])
def test_negative_or_fractional_step_counts_are_refused(default_dtype, bad):
    x, y = _data()
    bnn = BayesianNetwork(_net(), prior_scale="learned")
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        fit_viking(bnn, x, y, progress=False, **bad)


def test_frozen_parameters_stay_frozen(default_dtype):
    """A network parameter with ``requires_grad=False`` outside the posterior is a constant: the
    fit neither moves it nor turns its gradient on."""
    x, y = _data()
    net = _net()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    bnn = BayesianNetwork(net, prior_scale="learned", latent="2.*")
    fit = fit_viking(bnn, x, y, num_steps=20, warmup_steps=20, progress=False,
                     optim=pyro.optim.Adam({"lr": 1e-1}))
    assert torch.equal(net[0].weight, frozen)
    assert not net[0].weight.requires_grad
    assert "bnn.0.weight" not in pyro.get_param_store()
    assert torch.equal(bnn.network[0].weight, frozen)
    assert fit.guide.loc.shape == (10 * 3 + 3,)
