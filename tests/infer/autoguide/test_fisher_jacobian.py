"""``AutoViking(jacobian="fisher")``: the kernel of the GGN (Fisher-Rao metric) trains with SVI,
predicts with ``Predictive`` and goes through ``fit_viking``, in float32 and float64; a softmax
classifier's kernel is that of ``B (C − 1)`` rows (``Λ`` has rank ``C − 1``), and its Jacobian
takes the layer-Gram route with ``C`` rows per datum."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive
from torch import nn

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO, fit_viking
from pyro_viking.infer.autoguide.projector_choice import ProjectorBuilder

N, C = 24, 3


def _problem(likelihood, batch_size=None, prior_scale=1.0):
    torch.manual_seed(0)
    out = C if likelihood == "classification" else 1
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, out))
    bnn = BayesianNetwork(net, likelihood, batch_size=batch_size, prior_scale=prior_scale)
    x = torch.randn(N, 2)
    y = {"classification": torch.randint(0, C, (N,)),
         "binary": (x[:, 0] > 0).to(x.dtype),
         "regression": x.sum(-1).sin()}[likelihood]
    return bnn, x, y


def _assert_rank(rank, rows, dtype):
    """The rows' rank (``D`` = 99 or 65 > rows): exact in float64; in float32 the Gram's
    threshold may drop the few directions of this small net below ``1e-10`` of the largest."""
    assert rank == rows if dtype == torch.float64 else rows - 3 <= rank <= rows


@pytest.mark.parametrize("likelihood", ["classification", "binary", "regression"])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_fisher_guide_trains_and_predicts(default_dtype, likelihood, batch_size):
    bnn, x, y = _problem(likelihood, batch_size)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, jacobian="fisher")
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    assert math.isfinite(svi.step(x, y))
    assert guide.jacobian == "fisher" and guide.backend_used == "layer_gram"
    B = batch_size or N
    rows_per_datum = C - 1 if likelihood == "classification" else 1
    _assert_rank(guide.last_projector.rank, B * rows_per_datum, default_dtype)
    assert all(math.isfinite(svi.step(x, y)) for _ in range(9))
    pred = Predictive(bnn, guide=guide, num_samples=7)(torch.randn(5, 2))
    assert pred["obs"].shape == (7, 5)
    site = bnn.output_site
    pred = Predictive(bnn, guide=guide, num_samples=7, return_sites=[site])(torch.randn(5, 2))
    assert pred[site].isfinite().all()


def test_fisher_guide_with_the_gradient_through_the_projection(default_dtype):
    bnn, x, y = _problem("classification")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, jacobian="fisher",
                       grad_through_projection=True)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    assert guide.backend_used == "layer_gram"


@pytest.mark.parametrize("backend", ["per_example", "matrix_free"])
@pytest.mark.filterwarnings("ignore::pyro_viking.linalg.ConvergenceWarning")  # CG, cond ~1e11
def test_fisher_guide_on_the_other_backends(default_dtype, backend):
    bnn, x, y = _problem("classification")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, jacobian="fisher", backend=backend)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    assert guide.backend_used == backend


def test_output_jacobian_keeps_its_dense_route(default_dtype):
    """``"output"`` is unchanged: one row per datum on the layer-Gram route, so ``"auto"`` builds
    it densely; its ``B·C`` rows (normalised logits, ``pᵀ ∂l = 0``) have rank ``B (C − 1)``."""
    bnn, x, y = _problem("classification")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, jacobian="output")
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    assert math.isfinite(svi.step(x, y))
    assert guide.backend_used == "per_example"
    _assert_rank(guide.last_projector.rank, N * (C - 1), default_dtype)


def test_fit_viking_takes_the_fisher_jacobian(default_dtype):
    bnn, x, y = _problem("classification", batch_size=8, prior_scale="learned")
    fit = fit_viking(bnn, x, y, num_steps=5, warmup_steps=5, progress=False,
                     guide_options={"jacobian": "fisher"})
    assert fit.guide.jacobian == "fisher" and fit.guide.backend_used == "layer_gram"
    assert all(math.isfinite(v) for v in fit.history["loss"])
    pred = Predictive(bnn, guide=fit.guide, num_samples=4, return_sites=["logits"])(x[:3])
    assert pred["logits"].shape == (4, 3, C) and pred["logits"].isfinite().all()


def test_unknown_jacobian_is_refused_with_the_choices(default_dtype):
    with pytest.raises(ValueError, match="'loss', 'output', 'fisher'"):
        ProjectorBuilder(jacobian="ggn")
    with pytest.raises(ValueError, match="'loss', 'output', 'fisher'"):
        AutoViking(lambda: None, jacobian="ggn")
