"""A ``BayesianNetwork``'s outputs and labels against its likelihood
(``pyro_viking.nn.target_checks``): one output tensor, ``(B,)`` read as ``(B, 1)`` where the
likelihood has one output, class indices and binary labels in range, checked once per label
tensor on both the traced and the fused training step; and the data plate's ``num_data``."""

import pyro
import pytest
import torch
from bnn_networks import data, mlp
from pyro import poutine
from pyro.infer import SVI, Predictive
from torch import nn

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer.elbo import fused_applies
from pyro_viking.nn import target_checks


class _Squeezed(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).squeeze(-1)


def _svi(bnn, **elbo):
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    return guide, SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO(**elbo))


@pytest.mark.parametrize("likelihood", ["regression", "binary"])
def test_one_output_per_datum_is_b_by_1_with_vectorised_particles(default_dtype, likelihood):
    """``(B,)`` outputs give the losses of ``(B, 1)`` outputs, step by step (traced, fused and
    vectorised weight samples), and predict ``(S, B, 1)`` outputs."""
    x, y = data(default_dtype, n=30)
    y = torch.sin(x[:, 0]) if likelihood == "regression" else (x[:, 0] > 0).to(x.dtype)
    losses = []
    for net in (_Squeezed(mlp(default_dtype, out=1)), mlp(default_dtype, out=1)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        bnn = BayesianNetwork(net, likelihood, prior_scale="learned", batch_size=10)
        guide, svi = _svi(bnn, num_particles=3, vectorize_particles=True, max_plate_nesting=1)
        losses.append([svi.step(x, y) for _ in range(3)])
        site = bnn.output_site
        pred = Predictive(bnn, guide=guide, num_samples=4, parallel=True)(x[:5])[site]
        assert pred.shape == (4, 5, 1)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("out", [1, 3])
def test_classification_needs_two_classes_or_more(default_dtype, out):
    x, y = data(default_dtype, n=12)
    net = mlp(default_dtype, out=1) if out == 1 else _Squeezed(mlp(default_dtype, out=1))
    with pytest.raises(ValueError, match=r"\(B, C\).*binary") as info:
        BayesianNetwork(net, "classification")(x, y)
    assert str((12, 1) if out == 1 else (12,)) in str(info.value)


def test_a_linearised_network_returning_a_tuple_is_refused(default_dtype):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(default_dtype)

        def forward(self, x):
            return self.net(x), x

    x, _ = data(default_dtype, n=6)
    bnn = BayesianNetwork(Pair())
    at = {bnn.site_name(n): p.detach() for n, p in bnn.net.named_parameters()}
    with pytest.raises(TypeError, match="one tensor.*tuple"):
        bnn.forward_network({n: p.detach() for n, p in bnn.net.named_parameters()}, x,
                            linearise_at=at)


def test_labels_are_scanned_once_per_tensor_and_again_when_changed(default_dtype,
                                                                   monkeypatch):
    """The whole label tensor is checked on the first call with it (whatever minibatch is
    drawn), not at every step; an in-place change is seen; a new tensor in a fused step too."""
    x, y = data(default_dtype, n=40)
    bnn = BayesianNetwork(mlp(default_dtype), prior_scale="learned", batch_size=8)
    guide, svi = _svi(bnn)
    scans = []
    scan = target_checks.check_label_values
    monkeypatch.setattr(target_checks, "check_label_values",
                        lambda likelihood, t, width: scans.append(t.shape) or
                        scan(likelihood, t, width))
    for _ in range(3):  # traced, then fused steps
        svi.step(x, y)
    assert fused_applies(svi.loss_and_grads.__self__, bnn, guide, (x, y), {})
    assert scans == [(40,)]
    y[7] = 3  # in place: a new version of the same tensor, caught by the fused step
    with pytest.raises(ValueError, match=r"0\.\.2.*row 7 is 3"):
        svi.step(x, y)
    y[7] = 0
    bad = y.clone()
    bad[39] = -100  # PyTorch's ignore_index: not skipped, refused
    with pytest.raises(ValueError, match="row 39 is -100"):
        svi.step(x, bad)
    svi.step(x, y)


def test_binary_labels_in_the_fused_step(default_dtype):
    x, _ = data(default_dtype, n=20)
    y = (x[:, 0] > 0).to(x.dtype)
    bnn = BayesianNetwork(mlp(default_dtype, out=1), "binary", batch_size=5)
    _, svi = _svi(bnn)
    svi.step(x, y)
    bad = y.clone()
    bad[3] = 0.5
    with pytest.raises(ValueError, match=r"0 or 1.*row 3 is 0\.5"):
        svi.step(x, bad)


def test_a_minibatch_larger_than_num_data_is_refused(default_dtype):
    """``num_data`` is N, the whole data set: a minibatch above it would scale the likelihood
    by less than one. Prediction on more rows than ``num_data`` is fine."""
    x, y = data(default_dtype, n=32)
    bnn = BayesianNetwork(mlp(default_dtype), num_data=10)
    with pytest.raises(ValueError, match=r"32 rows with num_data=10.*len\(loader\.dataset\)"):
        bnn(x, y)
    assert bnn(x).shape == (32, 3)
    site = poutine.trace(bnn).get_trace(x[:10], y[:10]).nodes["obs"]
    assert site["scale"] == pytest.approx(1.0)
