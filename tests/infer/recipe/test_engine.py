"""The engines of the recipe (pyro_viking.infer.recipe.engine): ``fit_viking(engine="module")``,
the ELBO module stepped by ``torch.optim`` optimisers built from the Pyro optimiser, takes the
steps of ``engine="svi"`` (same seed: the same loss at every step of every phase, and the same
param store entries with the same values afterwards, in float64 to 1e-10) on a classifier with
a learned prior scale, a regression with learned noise and kernel scales, with the scales-only
phase and per-parameter learning rates, with ``batches=``, with ``ClippedAdam``'s decaying
learning rate, and with plain Pyro models (a ``PyroModule`` reading a global ``pyro.param``, a
function); the fitted guide then serves ``Predictive``, ``median``, ``project_training_data``
and pickling as after ``SVI``."""

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from test_fit import PRIOR, TinyBNN, moons
from torch import nn

from pyro_viking import BayesianNetwork, fit_viking, select_beta
from pyro_viking.infer.recipe.engine import (
    ENGINES,
    ModuleStepper,
    module_optimiser_problem,
    resolve_engine,
)
from pyro_viking.infer.recipe.warmup import fit_map

TOL = dict(rtol=1e-10, atol=1e-10)


def _data(likelihood, n=60):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    if likelihood == "classification":
        return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g)


def _bnn(likelihood, **options):
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 1
    net = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, out))
    return BayesianNetwork(net, likelihood, **options)


def _store():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store}


def _fit(engine, make_model, *args, optim=None, **options):
    """A fit on a clean store under seed 0: ``(fit, store entries)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    options = {"num_steps": 20, "warmup_steps": 15, "progress": False, **options}
    fit = fit_viking(make_model(), *args, engine=engine,
                     optim=optim() if optim else pyro.optim.Adam({"lr": 1e-2}), **options)
    return fit, _store()


def _assert_same_fits(a, b):
    (fit_a, store_a), (fit_b, store_b) = a, b
    assert fit_a.history["phase"] == fit_b.history["phase"]
    for key in ("loss", "image_scale", "kernel_scale", "prior_scale"):
        assert fit_b.history[key] == pytest.approx(fit_a.history[key], nan_ok=True, rel=1e-10,
                                                   abs=1e-10), key
    assert store_a.keys() == store_b.keys()
    for name, value in store_a.items():
        torch.testing.assert_close(store_b[name], value, **TOL, msg=name)
    torch.testing.assert_close(fit_b.guide.loc.detach(), fit_a.guide.loc.detach(), **TOL)


def _clipped_adam():
    return pyro.optim.ClippedAdam({"lr": 2e-2, "lrd": 0.99, "clip_norm": 0.5})


CASES = {
    "classification, learned prior scale": (
        lambda: _bnn("classification", prior_scale="learned", batch_size=16),
        "classification", {}),
    "regression, learned noise, learned kernel scale": (
        lambda: _bnn("regression", prior_scale=0.5, noise_scale="learned", batch_size=16),
        "regression", dict(kernel_scale="learned")),
    "scales phase, scales_lr_factor, hidden first layer": (
        lambda: _bnn("classification", prior_scale="learned", latent="2", batch_size=16),
        "classification", dict(scales_steps=10, scales_lr_factor=3.0)),
    "ClippedAdam with decay, learned noise, no curvature start": (
        lambda: _bnn("regression", prior_scale="learned", noise_scale="learned", batch_size=16),
        "regression", dict(init_scales=False, optim=_clipped_adam, scales_steps=5)),
}


@pytest.mark.float64_only
@pytest.mark.parametrize("case", list(CASES))
def test_module_engine_takes_the_steps_of_svi(case, default_dtype):
    make_model, likelihood, options = CASES[case]
    x, y = _data(likelihood)
    svi = _fit("svi", make_model, x, y, **options)
    module = _fit("module", make_model, x, y, **options)
    _assert_same_fits(svi, module)
    assert svi[0].history["image_scale"][-1] != svi[0].history["image_scale"][-5]  # it trained


@pytest.mark.float64_only
def test_module_engine_with_batches(default_dtype):
    x, y = _data("regression")
    batches = [(x[i], y[i]) for i in torch.arange(60).chunk(4)]

    def make_model():
        return _bnn("regression", prior_scale="learned", noise_scale="learned", num_data=60)

    _assert_same_fits(*(_fit(e, make_model, batches=batches, curvature_batches=2)
                        for e in ("svi", "module")))


@pytest.mark.float64_only
def test_module_engine_on_plain_pyro_models(default_dtype):
    """A ``PyroModule`` reading a global ``pyro.param`` (the learned prior scale), and a plain
    function scaling its own minibatches (``batches=``)."""
    x, y = moons(default_dtype)
    options = dict(beta=0.1, prior_scale_param=PRIOR, scales_steps=5)
    _assert_same_fits(*(_fit(e, lambda: TinyBNN(default_dtype), x, y, 48, **options)
                        for e in ("svi", "module")))

    def make_model():
        model = TinyBNN(default_dtype, prior_scale=0.7)

        def batched(xb, yb, idx):
            with pyro.poutine.scale(scale=len(x) / len(idx)):
                model(xb, yb)

        return batched

    batches = [(x[i], y[i], i) for i in torch.arange(len(x)).chunk(2)]
    _assert_same_fits(*(_fit(e, make_model, batches=batches, beta=0.3, curvature_batches=2)
                        for e in ("svi", "module")))


@pytest.mark.float64_only
def test_select_beta_takes_the_engine(default_dtype):
    x, y = _data("classification")
    xv, yv = _data("classification", 30)
    tables = {}
    for engine in ("svi", "module"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        result = select_beta(_bnn("classification", prior_scale="learned", batch_size=16), x, y,
                             validation=(xv, yv), betas=(0.1, 0.001), num_steps=10,
                             warmup_steps=10, num_samples=4, progress=False, engine=engine,
                             optim_factory=lambda: pyro.optim.Adam({"lr": 1e-2}))
        tables[engine] = (result.table, _store())
    (table_a, store_a), (table_b, store_b) = tables["svi"], tables["module"]
    assert len(table_a) == len(table_b)
    for row_a, row_b in zip(table_a, table_b):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            assert row_b[key] == (pytest.approx(value, rel=1e-10, nan_ok=True)
                                  if isinstance(value, float) else value), key
    assert store_a.keys() == store_b.keys()
    for name, value in store_a.items():
        torch.testing.assert_close(store_b[name], value, **TOL, msg=name)


def test_module_fit_serves_prediction_and_pickling(default_dtype):
    """After a module fit (user's default dtype too): the store holds the entries an SVI fit
    leaves, the Pyro optimiser holds the state of what was trained (one optimiser per parameter,
    as after SVI), and the guide predicts, gives its median, projects on the training data, and
    survives a pickle."""
    x, y = _data("regression")
    optim = pyro.optim.Adam({"lr": 1e-2})

    def make_model():
        return _bnn("regression", prior_scale="learned", noise_scale="learned", batch_size=16)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = make_model()
    fit = fit_viking(model, x, y, num_steps=10, warmup_steps=10, progress=False, optim=optim,
                     engine="module")
    keys = set(pyro.get_param_store().keys())
    assert {"AutoViking.loc", "AutoViking.image_scale"} <= set(optim.get_state())
    _, svi_store = _fit("svi", make_model, x, y, num_steps=10, warmup_steps=10)
    assert keys == set(svi_store)
    guide = fit.guide
    assert guide.median()["bnn.0.weight"].shape == (10, 4)
    guide.project_training_data(x, y, num_samples=8)
    draws = Predictive(model, guide=guide, num_samples=8)(x[:5])["obs"]
    assert draws.shape == (8, 5) and draws.dtype == default_dtype and draws.std(0).min() > 0
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.set_model(model)
    torch.testing.assert_close(loaded.loc.detach(), guide.loc.detach())
    assert math.isfinite(float(loaded.image_scale))


def test_fit_map_takes_the_engine(default_dtype):
    x, y = _data("classification")
    maps = []
    for engine in ("svi", "module"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        maps.append(fit_map(_bnn("classification", prior_scale="learned", batch_size=16), x, y,
                            num_steps=10, optim=pyro.optim.Adam({"lr": 1e-2}), progress=False,
                            engine=engine))
    for name, value in maps[0].items():
        torch.testing.assert_close(maps[1][name], value, msg=name)


class _Scheduled(pyro.optim.PyroOptim):
    pass


def test_engine_names_and_unsupported_optimisers(default_dtype):
    adam = pyro.optim.Adam({"lr": 1e-2})
    assert ENGINES == ("svi", "module", "auto")
    assert resolve_engine("auto", adam) == "module" and module_optimiser_problem(adam) is None
    assert resolve_engine("svi", adam) == "svi"
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("torch", adam)
    unsupported = [
        pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-2},
                                  "gamma": 0.9}),
        pyro.optim.PyroOptim(lambda params, lr: torch.optim.Adam(params, lr=lr), {"lr": 1e-2}),
        pyro.optim.PyroOptim(torch.optim.LBFGS, {}),
        _Scheduled(torch.optim.Adam, {"lr": 1e-2}),
    ]
    for optim in unsupported:
        assert resolve_engine("auto", optim) == "svi"
        with pytest.raises(ValueError, match="engine='svi'"):
            resolve_engine("module", optim)
    x, y = _data("classification")
    bnn = _bnn("classification", prior_scale="learned", batch_size=16)
    with pytest.raises(ValueError, match="ExponentialLR.*engine='svi'"):
        fit_viking(bnn, x, y, num_steps=2, warmup_steps=2, progress=False, engine="module",
                   optim=unsupported[0])
    with pytest.raises(ValueError, match="engine must be one of"):
        fit_viking(bnn, x, y, num_steps=2, progress=False, engine="SVI")


@pytest.mark.float64_only
def test_a_parameter_read_in_some_steps_keeps_its_own_state(default_dtype):
    """Parameters first seen together are stepped by one optimiser; when a step reads only
    some of them, the optimiser splits and each keeps its state and (decayed) learning rate:
    the steps equal ``SVI``'s, which steps one optimiser per parameter read."""

    def model(step):
        loc = pyro.param("a", torch.tensor(1.0))
        if step % 3 == 0:  # b is read every third step only
            loc = loc + pyro.param("b", torch.tensor(2.0))
        pyro.sample("z", dist.Normal(loc, 1.0), obs=torch.tensor(0.5))

    def guide(step):
        pass

    values = []
    for engine in ("svi", "module"):
        pyro.clear_param_store()
        optim = _clipped_adam()
        elbo = pyro.infer.Trace_ELBO()
        stepper = pyro.infer.SVI(model, guide, optim, elbo) if engine == "svi" else \
            ModuleStepper(model, guide, optim, elbo)
        losses = [stepper.step(step) for step in range(12)]
        values.append(losses + [float(pyro.param("a")), float(pyro.param("b"))])
    assert values[1] == pytest.approx(values[0], rel=1e-12)
    assert values[0][-1] != pytest.approx(2.0)  # b trained


@pytest.mark.float64_only
@pytest.mark.parametrize("case", ["classification, learned prior scale",
                                  "ClippedAdam with decay, learned noise, no curvature start"])
def test_module_engine_leaves_the_optimiser_state_svi_leaves(case, default_dtype):
    """After a fit, the Pyro optimiser's ``get_state`` (what ``save`` writes) holds the same
    per-parameter states and (decayed) learning rates on both engines."""
    make_model, likelihood, options = CASES[case]
    x, y = _data(likelihood)
    states = []
    for engine in ("svi", "module"):
        optim = options.get("optim", lambda: pyro.optim.Adam({"lr": 1e-2}))()
        _fit(engine, make_model, x, y, **{**options, "optim": lambda: optim})  # noqa: B023
        states.append(optim.get_state())
    svi, module = states
    assert svi and module.keys() == svi.keys()
    for name, want in svi.items():
        got = module[name]
        assert got["param_groups"] == want["param_groups"], name
        assert got["state"][0].keys() == want["state"][0].keys()
        for key, value in want["state"][0].items():
            torch.testing.assert_close(got["state"][0][key], value, **TOL, msg=f"{name} {key}")


@pytest.mark.float64_only
def test_module_engine_resumes_from_a_loaded_optimiser_state(default_dtype):
    """Training resumed from a saved param store and optimiser state takes the steps of an
    uninterrupted ``SVI`` run on either engine (a loaded state no longer sends ``auto`` to
    ``SVI``); and ``SVI`` takes over from the module engine's state."""

    def model():
        loc = pyro.param("a", torch.tensor(1.0))
        scale = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale), obs=torch.tensor(0.5))

    def guide():
        pass

    def run(stepper_of, steps):
        optim = _clipped_adam()
        stepper = stepper_of(optim)
        return optim, [stepper.step() for _ in range(steps)]

    def svi(optim):
        return pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())

    def module(optim):
        return ModuleStepper(model, guide, optim, pyro.infer.Trace_ELBO())

    pyro.clear_param_store()
    _, straight = run(svi, 12)
    straight += [float(pyro.param("a")), float(pyro.param("s"))]

    pyro.clear_param_store()
    optim, first = run(svi, 5)
    saved = io.BytesIO()  # as optim.save and the param store's save write them
    torch.save((optim.get_state(), pyro.get_param_store().get_state()), saved)
    for stepper_of in (svi, module):
        saved.seek(0)
        saved_optim, saved_store = torch.load(saved, weights_only=False)
        pyro.get_param_store().set_state(saved_store)
        optim = _clipped_adam()
        optim.set_state(saved_optim)
        assert resolve_engine("auto", optim) == "module"
        stepper = stepper_of(optim)
        rest = [stepper.step() for _ in range(7)]
        got = first + rest + [float(pyro.param("a")), float(pyro.param("s"))]
        assert got == pytest.approx(straight, rel=1e-12), stepper_of.__name__

    pyro.clear_param_store()  # module engine for 5 steps, then SVI on its optimiser
    optim = _clipped_adam()
    stepper = module(optim)
    first = [stepper.step() for _ in range(5)]
    stepper.sync()  # (fit_viking's phases end with it)
    takeover = svi(optim)
    rest = [takeover.step() for _ in range(7)]
    got = first + rest + [float(pyro.param("a")), float(pyro.param("s"))]
    assert got == pytest.approx(straight, rel=1e-12)
