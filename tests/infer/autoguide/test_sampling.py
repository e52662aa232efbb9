"""Prediction draws of AutoViking come from samples projected on the *training* data
(:class:`~pyro_viking.infer.autoguide.sampling.SamplingState`): right after SVI the first
prediction projects lazily on the training call's data (a pass over a subsampled plate), the
predictive covariance is then the exact posterior's, training batch by batch warns with the fix,
and ``Predictive`` draws each projected sample once.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from problems import linreg, linreg_data, logreg, projected_guide
from pyro.infer import SVI, Predictive
from pyro.infer.autoguide.initialization import init_to_value
from pyro.optim import Adam, ClippedAdam
from torch.func import jacrev

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.model_trace.rows import make_rows_fn

N_EX, D_EX, NOISE = 5, 12, 0.5


def exact_problem():
    """Orthogonal rows of norm 2: the posterior ``N(m, s² P + v (I − P))`` is in the family."""
    g = torch.Generator().manual_seed(20252)
    Q, _ = torch.linalg.qr(torch.randn(D_EX, N_EX, generator=g, dtype=torch.float64))
    X = 2.0 * Q.T
    y = X @ torch.randn(D_EX, generator=g, dtype=torch.float64) \
        + NOISE * torch.randn(N_EX, generator=g, dtype=torch.float64)
    cov = torch.linalg.inv(X.T @ X / NOISE**2 + torch.eye(D_EX, dtype=torch.float64))
    return X, y, cov


def exact_model(X, y=None):
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0).expand([D_EX]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal((X * theta).sum(-1), NOISE), obs=y)


def test_predictive_after_svi_has_the_exact_covariance(dtype):
    """No manual ``project_training_data``: the first prediction after training projects on the
    training data (every step had the same data), so the sample covariance of the predictive
    draws (of θ and of ``X_test θ``) matches the exact posterior covariance within two Monte
    Carlo errors, for ``Predictive`` and for a vectorised prediction call of the guide."""
    X64, y64, cov = exact_problem()
    X, y = X64.to(dtype), y64.to(dtype)
    mle = torch.linalg.pinv(X) @ y
    guide = AutoViking(exact_model, init_loc_fn=init_to_value(values={"theta": mle}),
                       grad_through_projection=False)
    elbo = TraceViking_ELBO(num_particles=32, vectorize_particles=True)
    svi = SVI(exact_model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.98}), elbo)
    for _ in range(150):
        svi.step(X, y)
    X_test = torch.randn(7, D_EX, generator=torch.Generator().manual_seed(3)).to(dtype)
    # Predictive (sequential): S ≤ the 100 samples the guide projects (more cycle through
    # them, as explicit caches do); a vectorised prediction call of the guide asks for S draws
    # at once (as Predictive(parallel=True) does) and gets S projected samples.
    for S, parallel in ((100, False), (1000, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about
            if parallel:
                with torch.no_grad(), poutine.mask(mask=False), pyro.plate("s", S, dim=-2):
                    theta = guide(X_test)["theta"]
            else:
                theta = Predictive(exact_model, guide=guide, num_samples=S)(X_test)["theta"]
        theta = theta.reshape(S, D_EX).double()
        for A in (torch.eye(D_EX, dtype=torch.float64), X_test.double()):  # θ and X_test θ
            C_exact = A @ cov @ A.T
            err = (torch.cov((theta @ A.T).T) - C_exact).norm()
            # E‖Ĉ − C‖_F² ≈ (‖C‖_F² + (tr C)²) / S for Gaussian draws
            mc = ((C_exact.norm() ** 2 + C_exact.trace() ** 2) / S).sqrt()
            print(f"{dtype} S={S}: covariance error / Monte Carlo error = {err / mc:.2f}")
            assert err < 2.0 * mc, (err, mc)


def test_lazy_projection_walks_a_subsampled_plate(dtype):
    """A subsampled data plate, the same tensors at every step: the first prediction projects
    one alternating pass over the whole training set (as ``project_training_data`` does), so
    the kernel samples are nearly orthogonal to the whole data set's Jacobian rows."""
    N, D = 64, 128
    g = torch.Generator().manual_seed(20251)
    x = (torch.randn(N, D, generator=g, dtype=torch.float64) / math.sqrt(D)).to(dtype)
    y = torch.randint(0, 2, (N,), generator=g).to(dtype)
    guide = AutoViking(logreg)
    SVI(logreg, guide, Adam({"lr": 1e-3}), TraceViking_ELBO()).step(x, y)
    assert guide.projected_samples is None
    Predictive(logreg, guide=guide, num_samples=8)(x)
    eps, k = guide.projected_samples
    loc = guide.loc.detach()
    J = torch.cat([jacrev(make_rows_fn(logreg, guide.layout, (x, y), {},
                                       subsample={"data": torch.arange(i, i + 16)}))(loc)
                   for i in range(0, N, 16)])
    ratio = ((J @ k.T).norm() / (J @ eps.T).norm()).item()
    # one batch's kernel only: ≈ 0.87 (3/4 of the data unseen); one pass: well below
    assert ratio < 0.5, ratio


def test_batch_by_batch_training_warns_and_says_what_to_do(float32):
    """Training on changing batches leaves no training data to project on: prediction warns
    and names ``project_training_data``; after it, prediction is silent."""
    x, y = linreg_data(12, 3)
    guide = AutoViking(linreg)
    svi = SVI(linreg, guide, Adam({"lr": 0.01}), TraceViking_ELBO())
    for i in range(0, 12, 4):
        svi.step(x[i:i + 4], y[i:i + 4])
    with pytest.warns(UserWarning, match="project_training_data"):
        Predictive(linreg, guide=guide, num_samples=3)(x)
    guide.project_training_data(batches=[(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictive(linreg, guide=guide, num_samples=3)(x)


def test_predictive_draws_each_projected_sample_once_without_a_warning(float32):
    """Predictive runs the guide twice before its S draws (pyro 1.9): S projected samples
    serve S distinct predictions, silently; one more draw than that warns."""
    x, y = linreg_data(20, 3)
    guide = projected_guide(linreg, x, y, num_samples=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = Predictive(linreg, guide=guide, num_samples=10)(x)["w"].reshape(10, 3)
    assert torch.unique(w, dim=0).shape[0] == 10
    with pytest.warns(UserWarning, match="11 draws on the same inputs but only 10"):
        Predictive(linreg, guide=guide, num_samples=11)(x[:5])
