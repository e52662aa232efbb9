"""The linearised (GLM) predictive of a :class:`~pyro_viking.BayesianNetwork`, as a Pyro model.

Around the posterior mean ``θ̂`` the network is replaced by its first-order expansion in the
latent parameters,

    f_lin(x; θ) = f(x; θ̂) + J_f(x; θ̂) (θ − θ̂),

and the likelihood is applied to ``f_lin``: with a Gaussian ``q(θ)`` this is the generalised
linear model predictive of the Laplace and GGN literature (Immer et al., 2021) and of the
fadel/viking toy examples. Along the kernel of ``J_f`` at the training inputs the prediction
there does not move, however large the sample, which is what VIKING's kernel is built for.

:func:`linearised_model` returns a callable with the model's signature, so the sampled
predictive and the linearised one differ only in the model handed to ``Predictive``::

    Predictive(bnn, guide=guide, num_samples=100)(x_test)                  # f(x; θ)
    Predictive(bnn.linearised(guide), guide=guide, num_samples=100)(x_test)  # f_lin(x; θ)

Each network call is one forward-mode product (``torch.func.jvp``): no Jacobian is formed.
What it costs against the sampled predictive is measured in ``docs/kernels_and_predictives.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Optional, Union

import pyro.poutine as poutine
from torch import Tensor

if TYPE_CHECKING:
    from pyro_viking.nn.bayesian_network import BayesianNetwork

__all__ = ["linearised_model"]

Reference = Union[Dict[str, Tensor], Callable[[], Dict[str, Tensor]], object]


def _reference_values(at: Reference, latent_sites) -> Dict[str, Tensor]:
    """Site name → ``θ̂`` tensor: ``at`` itself (a dict), ``at()`` (a callable), or
    ``at.median()`` (a guide; read now, so a guide trained further is followed)."""
    if isinstance(at, dict):
        values = at
    else:
        median = getattr(at, "median", None)
        if median is None and not callable(at):
            raise TypeError("linearised_model needs a guide (with .median()), a dict of site "
                            f"values or a callable returning one; got {type(at).__name__}")
        if getattr(at, "prototype_trace", True) is None:
            raise RuntimeError("the guide is not set up yet: train it (or call it once with the "
                               "training data) before asking for its linearised predictive")
        with poutine.block():  # reading the guide's parameters is no part of the model
            values = median() if median is not None else at()
    missing = [n for n in latent_sites if n not in values]
    if missing:
        raise ValueError(f"no reference value for the latent sites {missing}")
    return {n: values[n].detach() for n in latent_sites}


def linearised_model(bnn: BayesianNetwork, at: Reference) -> Callable[..., Tensor]:
    """A Pyro model ``model(x, y=None)`` equal to ``bnn(x, y)`` except that the network output
    is ``f(x; θ̂) + J_f(x; θ̂)(θ − θ̂)`` (linear in the sampled latents ``θ``; the hidden,
    non-latent parameters at their current values), ``θ̂`` read from ``at`` at every call:

    * a guide: ``at.median()`` (site name → constrained value; e.g. an ``AutoViking``'s ``θ̂``);
    * a dict site name → tensor, or a callable returning one.

    Sites, shapes and return value are ``bnn``'s (the output site ``"logits"``/``"loc"`` holds
    ``f_lin``), so ``Predictive(linearised_model(bnn, guide), guide=guide, num_samples=S)``
    gives the linearised predictive, sequential or ``parallel=True``. ``bnn.linearised(at)`` is
    the same call."""
    latent_sites = bnn.latent_sites

    def model(x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return bnn(x, y, linearise_at=_reference_values(at, latent_sites))

    model.__name__ = model.__qualname__ = f"linearised_{bnn.name}"
    return model
