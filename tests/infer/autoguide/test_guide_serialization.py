"""AutoViking saved and loaded (``torch.save`` and ``pickle``): the loaded guide predicts as the
live one, training goes on from the loaded state once the model is attached again, and training
before that says to call ``set_model``.
"""

import io
import math
import pickle
import warnings

import pyro
import pytest
import torch
from problems import linreg, linreg_data, regression, regression_data, trained
from pyro.infer import SVI, Predictive
from pyro.optim import Adam

from pyro_viking import AutoViking, TraceViking_ELBO


def _round_trip(guide, method):
    if method == "pickle":
        return pickle.loads(pickle.dumps(guide))
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _attach_if_asked(fn, guide, model):
    """Run ``fn``; a reloaded guide may ask (in its error message) for ``set_model``."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - the message is what is checked
        assert "set_model" in str(error), f"unhelpful error after reload: {error!r}"
        guide.set_model(model)
        return fn()


@pytest.mark.parametrize("method", ["torch", "pickle"])
def test_serialization_and_training_after_load(method):
    x, y = regression_data()
    guide = AutoViking(regression)
    trained(regression, guide, (x, y), steps=20)
    loaded = _round_trip(guide, method)
    assert guide.model is not None  # saving leaves the live guide usable
    for name, value in guide.median().items():
        torch.testing.assert_close(loaded.median()[name], value, rtol=0, atol=0)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in guide.state_dict().items()}
    pyro.set_rng_seed(1)
    expected = Predictive(regression, guide=guide, num_samples=5)(x)["y"]
    pyro.set_rng_seed(1)
    actual = _attach_if_asked(lambda: Predictive(regression, guide=loaded, num_samples=5)(x)["y"],
                              loaded, regression)
    torch.testing.assert_close(actual, expected)
    # Training goes on from the loaded state.
    pyro.clear_param_store()
    before = loaded.loc.detach().clone()
    svi = SVI(regression, loaded, Adam({"lr": 0.05}), TraceViking_ELBO())
    losses = [_attach_if_asked(lambda: svi.step(x, y), loaded, regression) for _ in range(10)]
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(loaded.loc.detach(), before)


def test_training_after_reload_says_set_model(dtype):
    """Saving projects on the training data first, so the loaded guide predicts as the live one
    (no warning); an SVI step of the loaded guide raises an error that says to call
    ``set_model``, and trains after it."""
    x, y = linreg_data(6, 3)
    guide = AutoViking(linreg)
    svi_step = SVI(linreg, guide, Adam({"lr": 0.01}), TraceViking_ELBO()).step
    svi_step(x, y)
    buf = io.BytesIO()
    torch.save(guide, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro.set_rng_seed(3)
        got = Predictive(linreg, guide=loaded, num_samples=4)(x)["y"]
    pyro.set_rng_seed(3)
    torch.testing.assert_close(got, Predictive(linreg, guide=guide, num_samples=4)(x)["y"])
    svi = SVI(linreg, loaded, Adam({"lr": 0.01}), TraceViking_ELBO())
    with pytest.raises(RuntimeError, match="set_model"):
        svi.step(x, y)
    loaded.set_model(linreg)
    assert math.isfinite(svi.step(x, y))
