"""Test problems with known rank and spectrum, dense reference implementations, and the small
Pyro models and data sets that several test files share.

Shipped for the tests (pnkraemer/matfree ``test_util.py`` style): every structured object of the
package has a dense twin here, built with plain ``torch.linalg``. The Pyro models and data sets
are built in the current default dtype (the ``conftest.py`` fixtures set it per test).
"""

from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam
from torch import Tensor
from torch.distributions import MultivariateNormal

from pyro_viking import AutoViking, TraceViking_ELBO


def _orthonormal(n: int, k: int, generator: Optional[torch.Generator]) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    return Q


def jacobian_with_rank(B: int, D: int, r: int, *, cond: float = 1.0, duplicates: int = 0,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """A ``(B, D)`` matrix of rank ``r`` with singular values log-spaced from 1 to ``1/cond``.

    The last ``duplicates`` rows are copies of earlier rows (dependent data, a singular Gram
    matrix), so ``r ≤ min(B − duplicates, D)`` is required.
    """
    distinct = B - duplicates
    if not (0 <= r <= min(distinct, D)) or duplicates < 0:
        raise ValueError(f"need 0 ≤ r ≤ min(B − duplicates, D), got B={B} D={D} r={r} "
                         f"duplicates={duplicates}")
    s = torch.logspace(0.0, -math.log10(cond), r) if r else torch.zeros(0)
    J = (_orthonormal(distinct, r, generator) * s) @ _orthonormal(D, r, generator).T
    if duplicates:
        idx = torch.randint(0, distinct, (duplicates,), generator=generator)
        J = torch.cat([J, J[idx]])
    return J


def spd_matrix(n: int, *, cond: float = 10.0, rank: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Symmetric PSD ``(n, n)`` matrix, eigenvalues log-spaced in ``[1/cond, 1]`` (``rank`` of
    them non-zero, default all)."""
    rank = n if rank is None else rank
    Q = _orthonormal(n, rank, generator)
    lam = torch.logspace(0.0, -math.log10(cond), rank)
    G = (Q * lam) @ Q.T
    return 0.5 * (G + G.T)


def dense_projector(J: Tensor) -> Tensor:
    """``I − J⁺ J``, the orthogonal projector onto ``ker J`` (differentiable at full rank)."""
    D = J.shape[-1]
    return torch.eye(D, dtype=J.dtype) - torch.linalg.pinv(J) @ J


def dense_covariance(P: Tensor, kernel_scale, image_scale) -> Tensor:
    """``σ_k² P + σ_i² (I − P)`` (broadcast over the scales' batch shape)."""
    sk2 = torch.as_tensor(kernel_scale)[..., None, None] ** 2
    si2 = torch.as_tensor(image_scale)[..., None, None] ** 2
    eye = torch.eye(P.shape[-1], dtype=P.dtype)
    cov = sk2 * P + si2 * (eye - P)
    return 0.5 * (cov + cov.transpose(-1, -2))


def dense_twin(loc: Tensor, kernel_scale, image_scale, J: Tensor) -> MultivariateNormal:
    """``MultivariateNormal(loc, σ_k² P + σ_i² (I − P))`` with P from :func:`dense_projector`."""
    cov = dense_covariance(dense_projector(J), kernel_scale, image_scale)
    return MultivariateNormal(loc, covariance_matrix=cov)


def block_scale(D: int, values) -> Tensor:
    """A ``(D,)`` scale vector constant on ``len(values)`` contiguous blocks of near-equal size."""
    values = torch.as_tensor(values, dtype=torch.get_default_dtype())
    sizes = [len(c) for c in torch.arange(D).tensor_split(len(values))]
    return torch.repeat_interleave(values, torch.tensor(sizes))


def linear_model_jacobian(N: int, D: int, *, noise: float = 1.0,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """Loss Jacobian of Gaussian linear regression at a random θ: rows ``(y_i − x_iᵀθ) x_i/σ²``.

    ``N < D`` random design rows: an over-parameterised model with ``rank J = N`` (a.s.).
    """
    X = torch.randn(N, D, generator=generator)
    theta = torch.randn(D, generator=generator)
    y = X @ theta + torch.randn(N, generator=generator)
    return ((y - X @ (0.5 * theta)) / noise**2)[:, None] * X


# -- Pyro models and their data ------------------------------------------------------------------
def regression_data(n: int = 8, d: int = 3, seed: int = 3):
    """``x`` of shape ``(n, d)`` and ``y = x·(0.5, −1, 2)[:d] + 0.3 + 0.2 ε``, for
    :func:`regression`."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    x = torch.randn(n, d, generator=g).to(dtype)
    y = (x @ torch.tensor([0.5, -1.0, 2.0])[:d].to(dtype) + 0.3
         + 0.2 * torch.randn(n, generator=g).to(dtype))
    return x, y


def regression(x, y=None):
    """Vector weights, scalar bias and a HalfNormal noise scale; vectorisable over particles."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1) + b, sigma), obs=y)


def linreg_data(N: int, D: int, seed: int = 0):
    """``x`` of shape ``(N, D)`` and ``y = x w + 0.5 ε`` (``w`` drawn too; drawn in float64, then
    cast to the default dtype) for :func:`linreg`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(N, generator=g,
                                                                                 dtype=torch.float64)
    return x.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())


def linreg(x, y=None):
    """Linear regression with a fixed noise scale 0.5: ``w ~ N(0, I)``, ``y ~ N(x w, 0.25)``."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def noisy_linreg(x, y=None):
    """Linear regression with a ``HalfNormal`` noise-scale latent ``sigma``."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


def logreg(x, y=None):
    """Logistic regression; the data plate is subsampled (batches of 16), its size read from the
    data."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(x[idx] * w).sum(-1)),
                    obs=None if y is None else y[idx])


def known_weight_data(N: int = 20):
    """``X`` of shape ``(N, 3)`` and ``y = X·(1, −2, 0.5) + 0.3 ε``."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(N, generator=g)
    return X.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())


# -- guides ---------------------------------------------------------------------------------------
def trained(model, guide, args, steps: int, elbo=None, lr: float = 0.05) -> list:
    """The losses of ``steps`` SVI steps (Adam, ``TraceViking_ELBO`` unless ``elbo`` is given)."""
    svi = SVI(model, guide, Adam({"lr": lr}), elbo or TraceViking_ELBO())
    return [svi.step(*args) for _ in range(steps)]


def projected_guide(model, x, y, num_samples: int) -> AutoViking:
    """An AutoViking after 5 SVI steps, its prediction samples projected on ``(x, y)``."""
    guide = AutoViking(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), TraceViking_ELBO())
    for _ in range(5):
        svi.step(x, y)
    guide.project_training_data(x, y, num_samples=num_samples)
    return guide


def predictive_shapes(model, args, num_samples: int, parallel: bool = False) -> dict:
    """The shapes ``Predictive`` gives with Pyro's own ``AutoNormal`` (the reference)."""
    with pyro.get_param_store().scope():
        reference = AutoNormal(model)
        reference(*args)
        samples = Predictive(model, guide=reference, num_samples=num_samples,
                             parallel=parallel)(*args[:1])
    return {name: value.shape for name, value in samples.items()}
