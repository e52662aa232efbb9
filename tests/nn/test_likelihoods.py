"""A ``BayesianNetwork``'s observation model (``pyro_viking.nn.likelihoods``): the fused step's
row log-likelihoods equal the observation distribution's, and labels that do not fit the
likelihood get an error with the fix."""


import pyro
import pytest
import torch
from bnn_networks import mlp
from pyro.infer import SVI
from torch import nn

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.nn.bayesian_network import BayesianNetwork


@pytest.mark.parametrize("likelihood, out, y, message", [
    ("regression", 1, torch.zeros(6, 1), r"targets of shape \(N,\).*\(6, 1\).*squeeze"),
    ("regression", 2, torch.zeros(6), r"targets \(N, 2\).*\(6,\)"),
    ("classification", 3, torch.zeros(6, 1, dtype=torch.long), r"class indices.*\(6, 1\)"),
    ("binary", 1, torch.zeros(6, dtype=torch.long), r"float labels.*torch.int64.*y\.float\(\)"),
    ("regression", 1, torch.zeros(5), r"x has 6 rows, y has 5"),
])
def test_targets_that_do_not_fit_the_likelihood_raise(default_dtype, likelihood, out, y, message):
    """Labels/targets of the wrong shape or dtype get an error naming both and the fix (before:
    Pyro's 'invalid log_prob shape', a support error, a dtype cast error or an index error)."""
    bnn = BayesianNetwork(mlp(default_dtype, out=out), likelihood, batch_size=4)
    y = y.to(default_dtype) if y.is_floating_point() else y
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    with pytest.raises(ValueError, match=message):
        svi.step(torch.randn(6, 4, dtype=default_dtype), y)


@pytest.mark.parametrize("likelihood,out_dim", [("classification", 3), ("binary", 1),
                                                 ("regression", 1), ("regression", 2)])
def test_row_log_likelihood_equals_the_observation_distribution(likelihood, out_dim,
                                                                 default_dtype):
    """The fused step's rows ``log p(y_i | f_i)`` (no distribution built) equal the model's
    observation distribution, for unbatched and batched outputs, with their gradients."""
    torch.manual_seed(0)
    bnn = BayesianNetwork(nn.Linear(4, out_dim).to(default_dtype), likelihood, prior_scale=1.0,
                          noise_scale=0.7)
    B = 6
    if likelihood == "classification":
        y = torch.randint(0, out_dim, (B,))
    elif likelihood == "binary":
        y = torch.randint(0, 2, (B,)).to(default_dtype)
    else:
        y = torch.randn((B, out_dim) if out_dim > 1 else (B,), dtype=default_dtype)
    for lead in ((), (3,)):
        out = (3 * torch.randn(lead + (B, out_dim), dtype=default_dtype)).requires_grad_()
        got = bnn.row_log_likelihood(out, y)
        want = bnn.observation_distribution(out).log_prob(y)
        assert got.shape == want.shape == lead + (B,)
        torch.testing.assert_close(got, want)
        u = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, out, u)[0],
                                   torch.autograd.grad(want, out, u)[0])
