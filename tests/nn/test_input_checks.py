"""A ``BayesianNetwork``'s input checks (``pyro_viking.nn.input_checks``): NaN/inf rows named,
and torch's dtype and shape errors with the fix appended."""

import math

import pyro
import pytest
import torch
from bnn_networks import data, mlp
from pyro.infer import SVI, Predictive

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.nn.bayesian_network import BayesianNetwork


def test_non_finite_inputs_raise_with_the_rows(default_dtype):
    """NaN / inf inputs give an error naming the rows, in the traced step, in the fused step
    (after the training tensor is changed in place) and for prediction; a clean training
    tensor is checked once, not at every step."""
    pyro.clear_param_store()
    x, y = data(default_dtype, n=40)
    bnn = BayesianNetwork(mlp(default_dtype), prior_scale="learned", batch_size=8)
    bad = x.clone()
    bad[3, 1], bad[17, 0] = float("nan"), float("inf")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    with pytest.raises(ValueError, match=r"x holds NaN or inf in 2 of its 40 rows \(rows 3, 17\)"):
        svi.step(bad, y)
    calls = []
    isfinite = torch.isfinite
    try:
        torch.isfinite = lambda t: calls.append(t.shape) or isfinite(t)
        for _ in range(3):  # traced, then fused steps
            svi.step(x, y)
    finally:
        torch.isfinite = isfinite
    assert calls.count((40, 4)) == 1
    with torch.no_grad():
        x[5, 2] = float("nan")  # in place: a new version of the same tensor
    with pytest.raises(ValueError, match=r"rows 5\)"):
        svi.step(x, y)
    with pytest.raises(ValueError, match="x holds NaN or inf"):
        Predictive(bnn, guide=guide, num_samples=2)(bad[:10])


def test_inputs_of_another_dtype_get_the_fix():
    """float64 inputs (a tensor made from a NumPy array) for a float32 network: torch's dtype
    error with what to do appended; the same network on float32 inputs trains."""
    pyro.clear_param_store()
    x, y = data(torch.float64, n=20)
    bnn = BayesianNetwork(mlp(torch.float32), prior_scale="learned", batch_size=8)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    with pytest.raises(RuntimeError, match=r"(?s)dtype.*x is torch.float64 but the network's "
                                           r"parameters are torch.float32; pass x.to\(torch"
                                           r".float32\)"):
        svi.step(x, y)
    pyro.clear_param_store()
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    assert math.isfinite(svi.step(x.float(), y))


@pytest.mark.parametrize("parallel", [False, True])
def test_prediction_inputs_of_another_row_shape_get_the_fix(parallel, default_dtype):
    """Prediction inputs whose rows differ in shape from the training inputs (images left
    unflattened for an MLP): torch's shape error with the expected shape and the reshape to
    make appended; the reshaped inputs predict."""
    pyro.clear_param_store()
    x, y = data(default_dtype, n=16)
    bnn = BayesianNetwork(mlp(default_dtype), prior_scale="learned", batch_size=8)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    for _ in range(2):
        svi.step(x, y)
    images = torch.randn(5, 2, 2, dtype=default_dtype)
    predictive = Predictive(bnn, guide=guide, num_samples=3, parallel=parallel,
                            return_sites=["logits"])
    with pytest.raises(RuntimeError, match=r"(?s)x has rows of shape \(2, 2\) \(x is \(5, 2, "
                                           r"2\)\) but the network ran on rows of shape \(4,\) "
                                           r"before; pass inputs of shape \(N, 4\), e\.g\. "
                                           r"x\.reshape\(len\(x\), 4\)"):
        predictive(images)
    with pytest.raises(RuntimeError, match=r"rows of shape \(4,\) before; pass inputs of shape "
                                           r"\(N, 4\)\.\n"):
        predictive(torch.randn(5, 3, dtype=default_dtype))  # no reshape to suggest
    assert predictive(images.reshape(-1, 4))["logits"].shape == (3, 5, 3)
