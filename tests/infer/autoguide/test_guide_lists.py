"""AutoViking as one part of an ``AutoGuideList``: beside ``AutoDelta``, ``AutoNormal``, a callable
guide or a nested list; its Jacobian taken at the other guides' medians; a subsampled data plate
that only the AutoViking part holds; and the recipe for local latents of a subsampled plate
(AutoViking for the global ones, AutoNormal for the local ones); an amortised part (an encoder)
for local latents with event dims, whose median, the encoder's mean, is the Jacobian's point.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from problems import (
    linreg_data,
    noisy_linreg,
    predictive_shapes,
    regression,
    regression_data,
    trained,
)
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoGuideList, AutoNormal
from pyro.infer.autoguide.guides import AutoCallable
from pyro.optim import Adam
from pyro.util import check_model_guide_match
from torch.func import jacrev

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.model_trace.rows import make_rows_fn


def _callable_sigma_guide(x, y=None):
    loc = pyro.param("sigma_loc", lambda: torch.tensor(0.5),
                     constraint=dist.constraints.positive)
    pyro.sample("sigma", dist.Delta(loc))


@pytest.mark.parametrize("other", ["AutoDelta", "AutoNormal", "callable", "nested"])
@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceViking_ELBO], ids=["Trace", "Viking"])
def test_auto_guide_list(Elbo, other):
    """AutoViking for the regression weights, another guide for the noise scale."""
    x, y = regression_data()
    guide = AutoGuideList(regression)
    if other == "nested":
        inner = AutoGuideList(poutine.block(regression, hide=["sigma"]))
        inner.append(AutoViking(poutine.block(regression, hide=["sigma"])))
        guide.append(inner)
    else:
        guide.append(AutoViking(poutine.block(regression, hide=["sigma"])))
    if other == "callable":
        guide.append(_callable_sigma_guide)
    else:
        Other = AutoNormal if other == "AutoNormal" else AutoDelta
        guide.append(Other(poutine.block(regression, expose=["sigma"])))
    if other == "callable":  # no median of sigma: the Jacobian draws it from its prior
        with pytest.warns(UserWarning, match="AutoCallable"):
            losses = trained(regression, guide, (x, y), steps=30, elbo=Elbo(), lr=0.05)
    else:
        losses = trained(regression, guide, (x, y), steps=30, elbo=Elbo(), lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    for _, module in guide.named_modules():
        if module is not guide and isinstance(module, AutoViking):
            assert module.master is not None and module.master() is guide
    guide_trace = poutine.trace(guide).get_trace(x, y)
    check_model_guide_match(poutine.trace(regression).get_trace(x, y), guide_trace)
    assert {"w", "b", "sigma"} <= set(guide_trace.stochastic_nodes)
    if other != "callable":
        assert set(guide.median(x, y)) == {"w", "b", "sigma"}
    samples = Predictive(regression, guide=guide, num_samples=4)(x)
    expected = predictive_shapes(regression, (x, y), 4)
    assert {name: value.shape for name, value in samples.items()} == expected


# -- local latents of a subsampled plate --------------------------------------------------------
def local_latent_model(x, y=None, batch_size=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal((x[idx] * w).sum(-1) + u, 0.5),
                    obs=None if y is None else y[idx])


def test_local_latents_in_a_subsampled_plate():
    """Pyro's recipe works: AutoViking for the global weights, AutoNormal with ``create_plates``
    for the per-datum latents. AutoViking alone either keeps one location per datum (like
    AutoNormal) or refuses with an error that points to AutoGuideList."""
    x, y = regression_data(n=20)

    def create_plates(x, y=None, batch_size=None):
        return pyro.plate("data", x.shape[0], subsample_size=batch_size)

    guide = AutoGuideList(local_latent_model, create_plates=create_plates)
    guide.append(AutoViking(poutine.block(local_latent_model, hide=["u"])))
    guide.append(AutoNormal(poutine.block(local_latent_model, expose=["u"])))
    losses = trained(local_latent_model, guide, (x, y, 5), steps=20)
    assert all(math.isfinite(v) for v in losses)

    pyro.clear_param_store()
    alone = AutoViking(local_latent_model)
    try:
        trained(local_latent_model, alone, (x, y, 5), steps=2)
    except Exception as error:  # noqa: BLE001 - the message is what is checked
        assert "AutoGuideList" in str(error), repr(error)
    else:
        assert alone.latent_dim == 3 + 20


def test_local_latent_in_a_subsampled_plate_is_refused_and_the_list_trains(float32):
    """AutoViking alone refuses a latent of a subsampled plate with an error naming
    ``AutoGuideList``; the list (AutoViking for ``w``, AutoNormal for ``b``) trains."""
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=4) as idx:
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(w * x[idx] + b, 0.5), obs=y[idx])

    x, y = torch.randn(12), torch.randn(12)
    with pytest.raises(ValueError, match="AutoGuideList"):
        AutoViking(model)(x, y)
    guide = AutoGuideList(model)
    guide.append(AutoViking(poutine.block(model, hide=["b"])))
    guide.append(AutoNormal(poutine.block(model, expose=["b"])))
    svi = SVI(model, guide, Adam({"lr": 0.01}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(5))


# -- the Jacobian at the other guides' latents ---------------------------------------------------
def test_jacobian_is_taken_at_the_other_guides_medians(dtype):
    """The AutoViking part's Jacobian is taken at the other guide's median of ``sigma`` (the
    same at every call, equal to a dense ``jacrev`` there), not at a prior draw; SVI trains."""
    x, y = linreg_data(6, 3)
    guide = AutoGuideList(noisy_linreg)
    guide.append(AutoViking(poutine.block(noisy_linreg, hide=["sigma"])))
    guide.append(AutoNormal(poutine.block(noisy_linreg, expose=["sigma"])))
    guide(x, y)
    viking = guide[0]
    J1 = viking.last_projector.operator.to_dense()
    guide(x, y)
    J2 = viking.last_projector.operator.to_dense()
    torch.testing.assert_close(J1, J2)  # same θ̂, same P
    sigma = guide[1].median()["sigma"]
    J_ref = jacrev(make_rows_fn(noisy_linreg, viking.layout, (x, y), {},
                                condition={"sigma": sigma}))(viking.loc.detach())
    torch.testing.assert_close(J1, J_ref)
    losses = [SVI(noisy_linreg, guide, Adam({"lr": 0.02}), TraceViking_ELBO()).step(x, y)
              for _ in range(20)]
    assert all(map(math.isfinite, losses))


def noisy_linreg_subsampled(x, y=None):
    """Global latents only, data plate subsampled 8 at a time."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample_size=8) as idx:
        return pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), sigma),
                           obs=None if y is None else y[idx])


def test_subsampled_plate_with_global_latents_uses_one_minibatch(dtype):
    """The list's own plates hold no data plate when every latent is global: the AutoViking part
    adds it, so its projection and the model use the same minibatch, and the Jacobian is that
    minibatch's at the other guide's median of ``sigma``."""
    x, y = linreg_data(40, 3)
    model = noisy_linreg_subsampled
    guide = AutoGuideList(model)
    guide.append(AutoViking(poutine.block(model, hide=["sigma"])))
    guide.append(AutoNormal(poutine.block(model, expose=["sigma"])))
    guide(x, y)  # set up
    guide_trace = poutine.trace(guide).get_trace(x, y)
    idx = guide_trace.nodes["data"]["value"]
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    assert torch.equal(model_trace.nodes["data"]["value"], idx)
    viking = guide[0]
    sigma = guide[1].median()["sigma"]
    J_ref = jacrev(make_rows_fn(model, viking.layout, (x, y), {}, subsample={"data": idx},
                                condition={"sigma": sigma}))(viking.loc.detach())
    torch.testing.assert_close(viking.last_projector.operator.to_dense(), J_ref)
    svi = SVI(model, guide, Adam({"lr": 0.02}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(10))
    samples = Predictive(model, guide=guide, num_samples=4)(x)
    assert samples["y"].shape == (4, 8)


# -- an amortised part for local latents (a VAE's encoder) ---------------------------------------
L, P = 2, 3


def vae_like(x, batch_size=4):
    """Global decoder weights ``w``, a local code ``z`` (event dim 1) per datum of a subsampled
    plate, observations with event dim 1."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([L, P]).to_event(2))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([L]).to_event(1))
        pyro.sample("x", dist.Normal(torch.tanh(z @ w), 0.5).to_event(1), obs=x[idx])


class Encoder(AutoGuide):
    """``q(z_i | x_i) = N(x_i A, 0.1² I)``; its median is ``x A`` for every datum of ``x``."""

    def __init__(self, model):
        super().__init__(model)
        self.A = torch.nn.Parameter(torch.randn(P, L))

    def forward(self, x, batch_size=4):
        if self.prototype_trace is None:
            self._setup_prototype(x, batch_size)
        with self._create_plates(x, batch_size)["data"] as idx:
            z = pyro.sample("z", dist.Normal(x[idx] @ self.A, 0.1).to_event(1))
        return {"z": z}

    def median(self, x, batch_size=4):
        return {"z": (x @ self.A).detach()}


def test_jacobian_is_taken_at_an_amortised_parts_median_of_the_minibatch(dtype):
    """Local codes ``z`` (event dim 1) of a subsampled plate, guided by an encoder part: the
    AutoViking part's Jacobian is that of the minibatch the model replays, with ``z`` at the
    encoder's mean of the minibatch's data (not a prior draw, not another datum's code); SVI
    trains and the training data can be projected on."""
    x = torch.randn(12, P)
    guide = AutoGuideList(vae_like)
    guide.append(AutoViking(poutine.block(vae_like, hide=["z"])))
    guide.append(Encoder(poutine.block(vae_like, expose=["z"])))
    guide(x)  # set up
    guide_trace = poutine.trace(guide).get_trace(x)
    idx = guide_trace.nodes["data"]["value"]
    viking = guide[0]
    code = x[idx] @ guide[1].A.detach()
    J_ref = jacrev(make_rows_fn(vae_like, viking.layout, (x,), {}, subsample={"data": idx},
                                condition={"z": code}))(viking.loc.detach())
    torch.testing.assert_close(viking.last_projector.operator.to_dense(), J_ref)
    svi = SVI(vae_like, guide, Adam({"lr": 0.02}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x)) for _ in range(10))
    assert viking.project_training_data(x, num_samples=3).shape == (3, L * P)


def test_a_part_without_median_warns_once():
    """A callable part (Pyro's ``AutoCallable``, empty median) leaves its latents to prior
    draws in the Jacobian: one warning that names the fix; with a median, none."""
    x, y = regression_data()
    guide = AutoGuideList(regression)
    guide.append(AutoViking(poutine.block(regression, hide=["sigma"])))
    guide.append(_callable_sigma_guide)
    with pytest.warns(UserWarning, match="AutoCallable") as record:
        trained(regression, guide, (x, y), steps=3)
    assert sum("median" in str(w.message) for w in record) == 1
    pyro.clear_param_store()
    guide = AutoGuideList(regression)
    guide.append(AutoViking(poutine.block(regression, hide=["sigma"])))
    guide.append(AutoCallable(regression, _callable_sigma_guide,
                              lambda *args, **kwargs: {"sigma": torch.tensor(0.5)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained(regression, guide, (x, y), steps=3)
