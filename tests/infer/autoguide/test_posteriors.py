"""The prediction-time posterior of AutoViking
(:class:`~pyro_viking.infer.autoguide.posteriors.PredictionPosterior`): draws with and without
gradients agree, and its moments and entropy are those of the samples projected on the training
data.
"""

import math
import warnings

import pyro.poutine as poutine
import pytest
import torch
from problems import linreg, linreg_data, noisy_linreg, projected_guide

from pyro_viking import AutoViking


def test_prediction_draws_without_gradients_equal_the_differentiable_draws(dtype):
    """Predictive (no gradients) writes θ̂ + σ_im e + (σ_ker − σ_im) k straight from the cached
    samples, run by run of the cycle; with gradients on, the same values come from a gather
    and they reach loc and the scales."""
    x, y = linreg_data(20, 3)
    guide = projected_guide(noisy_linreg, x, y, num_samples=6)
    with poutine.mask(mask=False):
        q = guide.get_posterior(x)
    draws = {}
    for grad in (False, True):
        q.state.counter = 4  # 4, 5, then 0, 1, ...: a run that wraps around the cache
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 9 draws of 6 samples repeat, by design here
            draws[grad] = q.rsample((9,))
    torch.testing.assert_close(draws[False], draws[True].detach())
    e, k = q.noise[[4, 5, 0, 1, 2, 3, 4, 5, 0]], q.kernel[[4, 5, 0, 1, 2, 3, 4, 5, 0]]
    ref = q.loc + q.kernel_scale * k + q.image_scale * (e - k)
    torch.testing.assert_close(draws[True].detach(), ref.detach())
    draws[True].sum().backward()
    assert guide.loc.unconstrained().grad is not None


def test_prediction_posterior_moments(dtype):
    """Moments from samples projected on the training data: kernel dimension ``D − N`` (not D),
    marginal variances ``σ_im² + (σ_ker² − σ_im²) diag P``, the matching entropy; ``log_prob``
    is for training mode only."""
    N, D, S = 4, 10, 4000
    x, y = linreg_data(N, D)
    guide = AutoViking(linreg, init_image_scale=0.05)
    guide(x, y)
    guide.project_training_data(x, y, num_samples=S)
    with poutine.mask(mask=False):
        q_pred = guide.get_posterior(x[:2])
    with torch.no_grad():
        q_train = guide.get_posterior(x, y)  # the exact family member on the training data
    R = D - N
    assert abs(q_pred.kernel_dim.item() - R) < 4 * math.sqrt(2 * R / S) * 3, q_pred.kernel_dim
    torch.testing.assert_close(q_pred.variance, q_train.variance.to(q_pred.variance.dtype),
                               rtol=0.1, atol=0.1 * float(guide.kernel_scale) ** 2)
    assert abs(q_pred.entropy().item() - q_train.entropy().item()) < 0.5
    with pytest.raises(NotImplementedError, match="training mode"):
        q_pred.log_prob(torch.zeros(D))
