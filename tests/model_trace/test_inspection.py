"""What one model call contains (:mod:`pyro_viking.model_trace.inspection`): observations
validated, latent shapes kept, subsampled data plates and local latents found, RNG untouched."""

import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from problems import linreg, linreg_data, logreg

from pyro_viking.model_trace.inspection import (
    ModelInspector,
    check_no_subsampled_latents,
    inspect_model,
)
from pyro_viking.model_trace.layout import LatentLayout

N, D = 12, 3


def local_model(y, subsample_size=None, subsample=None):
    """A global ``mu`` and a local ``u`` per datum, in the data plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0], subsample_size=subsample_size,
                    subsample=subsample) as idx:
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(u, 0.5), obs=y[idx])


def layout_of(model, *args, **kwargs):
    return LatentLayout.from_trace(poutine.trace(model).get_trace(*args, **kwargs))


def test_valid_model():
    X, y = linreg_data(N, D)
    call = inspect_model(linreg, (X, y), {}, layout_of(linreg, X, y), training=True)
    assert call.has_observations and call.data_frames == {} and call.extra_latents == {}


def test_invalid_observations():
    X, y = linreg_data(N, D)
    layout = layout_of(linreg, X, y)
    y_bad = y.clone()
    y_bad[3] = float("nan")
    with pytest.raises(ValueError, match="observed site 'y' has non-finite"):
        inspect_model(linreg, (X, y_bad), {}, layout, training=True)
    inspect_model(linreg, (X, y_bad), {}, layout, training=False)  # prediction: not checked


def test_observations_outside_the_support():
    def model(y):
        p = pyro.sample("p", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Bernoulli(logits=p), obs=y)

    layout = layout_of(model, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="observed site 'y' has values outside the support"):
        inspect_model(model, (torch.tensor([0.0, 0.5, 1.0]),), {}, layout, training=True)


def test_no_observations_warns_once():
    X, y = linreg_data(N, D)
    layout = layout_of(linreg, X, y)
    assert not inspect_model(linreg, (X,), {}, layout, training=True).has_observations
    inspector = ModelInspector(linreg, layout)
    with pytest.warns(UserWarning, match="no observed sites"):
        inspector((X,), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not inspector((X,), {}).has_observations  # cached: no second warning


@pytest.mark.parametrize("training", [True, False])
def test_changed_latent_shape(training):
    X, y = linreg_data(N, D)
    layout = layout_of(linreg, X, y)
    msg = rf"latent 'w' of shape \({D},\), now called with \(5,\); create a new guide"
    with pytest.raises(ValueError, match=msg):
        inspect_model(linreg, (torch.randn(N, 5), y), {}, layout, training=training)


def test_keeps_rng_state():
    X, y = linreg_data(N, D)
    layout = layout_of(linreg, X, y)
    state = torch.get_rng_state()
    inspect_model(linreg, (X, y), {}, layout, training=True)
    assert torch.equal(state, torch.get_rng_state())


def test_subsampled_data_plate():
    X, y = linreg_data(40, D)
    y = (y > 0).to(X.dtype)
    call = inspect_model(logreg, (X, y), {}, layout_of(logreg, X, y), training=True)
    assert list(call.data_frames) == ["data"]
    frame = call.data_frames["data"]
    assert (frame.size, frame.full_size, frame.dim) == (16, 40, -1)


def test_local_latents_of_a_subsampled_plate():
    y = torch.randn(N)
    trace = poutine.trace(local_model).get_trace(y, subsample_size=4)
    layout = layout_of(poutine.block(local_model, hide=["u"]), y, subsample_size=4)
    call = inspect_model(local_model, (y,), {"subsample_size": 4}, layout, training=True)
    assert call.extra_latents == {"u": ((-1, "data"),)}
    assert list(call.data_frames) == ["data"]
    check_no_subsampled_latents(trace, ["mu"])
    with pytest.raises(ValueError, match="latent 'u' lies in the subsampled plate 'data'"):
        check_no_subsampled_latents(trace, ["mu", "u"])
    # indices given by the model: a subsampled plate, but not one a guide may replay
    given = inspect_model(local_model, (y,), {"subsample": torch.arange(4)}, layout,
                          training=True)
    assert given.data_frames == {} and given.extra_latents == {"u": ((-1, "data"),)}
