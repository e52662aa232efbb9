"""``BayesianNetwork`` checks its network's outputs and its labels once, up front, against the
likelihood, and the recipe checks the data it is given: a clear error naming the bad value and
the fix, never a wrong answer or a crash from deep inside torch."""

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO, fit_viking, select_beta


def _data(n=60, seed=1, regression=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    if regression:
        return x, torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def _net(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, out))


class _Wrap(nn.Module):
    def __init__(self, net, how):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x):
        out = self.net(x)
        if self.how == "squeeze":
            return out.squeeze(-1)
        if self.how == "tuple":
            return out, out.detach()
        return {"logits": out}


def _fit(bnn, *args, **options):
    options = {"num_steps": 5, "warmup_steps": 5, "progress": False, **options}
    return fit_viking(bnn, *args, **options)


def test_a_classifier_returning_one_number_per_datum_is_refused(default_dtype):
    """Logits of shape (B,) cannot be C ≥ 2 class scores: the first call says so and names the
    fixes (return (B, C), or ``likelihood="binary"`` for two classes)."""
    x, y = _data()
    bnn = BayesianNetwork(_Wrap(_net(1), "squeeze"), "classification", prior_scale="learned")
    with pytest.raises(ValueError, match=r"\(B, C\).*binary|binary.*\(B, C\)") as info:
        _fit(bnn, x, y)
    assert "(60,)" in str(info.value)
    with pytest.raises(ValueError, match="binary"):
        bnn(x, y)


def test_a_regression_network_returning_one_number_per_datum_works(default_dtype):
    """A regression network whose output is (B,) (squeezed) is one output per datum, as (B, 1):
    it trains and predicts with the same numbers as the unsqueezed network."""
    x, y = _data(regression=True)
    out = {}
    for how in ("squeeze", None):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        net = _net(1)
        bnn = BayesianNetwork(_Wrap(net, "squeeze") if how else net, "regression",
                              prior_scale="learned", noise_scale="learned")
        fit = _fit(bnn, x, y)  # targets (N,): what (B, 1) outputs take
        out[how] = fit.guide.loc.detach()
    assert torch.allclose(out["squeeze"], out[None])


@pytest.mark.parametrize("how", ["tuple", "dict"])
def test_a_network_returning_a_tuple_or_dict_is_refused(default_dtype, how):
    x, y = _data()
    bnn = BayesianNetwork(_Wrap(_net(), how), "classification")
    with pytest.raises(TypeError, match="one tensor") as info:
        bnn(x, y)
    assert type(_Wrap(_net(), how)(x)).__name__ in str(info.value)


@pytest.mark.parametrize("bad", [-100, -1, 3])
def test_labels_outside_the_classes_are_refused_up_front(default_dtype, bad):
    """A label outside ``0..C-1`` (PyTorch's ignore index −100 included) is refused on the first
    call with its row and value, whatever minibatch is drawn, not dropped or left to fail
    mid-training."""
    x, y = _data()
    y = y.clone()
    y[41] = bad
    bnn = BayesianNetwork(_net(), "classification", prior_scale="learned", batch_size=8)
    with pytest.raises(ValueError, match=rf"row 41.*{bad}|{bad}.*row 41") as info:
        fit_viking(bnn, x, y, num_steps=5, warmup_steps=5, progress=False)
    assert "0..2" in str(info.value) or "[0, 3)" in str(info.value)


def test_binary_labels_must_be_zero_or_one(default_dtype):
    x, y = _data()
    bnn = BayesianNetwork(_net(1), "binary")
    with pytest.raises(ValueError, match="0 or 1"):
        bnn(x, y.to(x.dtype))  # labels 0, 1, 2


def test_num_data_below_a_batch_is_refused(default_dtype):
    x, y = _data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    bnn = BayesianNetwork(_net(), num_data=10)
    with pytest.raises(ValueError, match="num_data=10.*32|32.*num_data=10"):
        _fit(bnn, batches=loader)


def test_num_data_that_disagrees_with_the_whole_data_is_refused(default_dtype):
    """``fit_viking(bnn, x, y)`` trains on all of ``x``: a ``num_data`` that differs from
    ``len(x)`` would rescale the likelihood by a wrong factor."""
    x, y = _data(64)
    bnn = BayesianNetwork(_net(), num_data=1000)
    with pytest.raises(ValueError, match="num_data=1000.*64|64.*num_data=1000"):
        _fit(bnn, x, y)


def test_minibatches_without_num_data_are_refused(default_dtype):
    """Batches from a loader with a ``BayesianNetwork`` that does not know N would each be
    taken for the whole data set (the likelihood scaled by B/N): an error names num_data."""
    x, y = _data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    bnn = BayesianNetwork(_net())
    with pytest.raises(ValueError, match="num_data=64"):
        _fit(bnn, batches=loader)
    bnn = BayesianNetwork(_net(), num_data=100)  # the loader's data set has 64
    with pytest.raises(ValueError, match="num_data=100.*64|64.*num_data=100"):
        _fit(bnn, batches=loader)


def test_a_generator_of_batches_is_refused_up_front(default_dtype):
    x, y = _data(64)
    bnn = BayesianNetwork(_net(), num_data=64)
    gen = ((x[i:i + 32], y[i:i + 32]) for i in (0, 32))
    with pytest.raises(TypeError, match="list"):
        _fit(bnn, batches=gen)


def test_no_data_is_refused(default_dtype):
    x, y = _data()
    bnn = BayesianNetwork(_net())
    with pytest.raises(ValueError, match="no data|0 rows|empty"):
        _fit(bnn, x[:0], y[:0])
    with pytest.raises(ValueError, match="no data|0 rows|empty"):
        select_beta(bnn, x[:0], y[:0], validation=(x, y), betas=(0.1,), progress=False)


def test_traced_and_fused_paths_agree_on_the_checks(default_dtype):
    """The same label error from Pyro's traced step (``fused=False``)."""
    x, y = _data()
    y = y.clone()
    y[5] = 7
    bnn = BayesianNetwork(_net(), "classification")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO(fused=False))
    with pytest.raises(ValueError, match="row 5"):
        svi.step(x, y)
