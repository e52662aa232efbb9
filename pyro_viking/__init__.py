"""pyro_viking: VIKING (kernel/image Gaussian) variational inference for Pyro models.

``q(θ) = N(θ̂, σ_ker² P + σ_im² (I − P))`` with ``P`` the projector onto the kernel of the
per-datum loss Jacobian (Fadel et al., NeurIPS 2025).

Layout (as Pyro's): :mod:`pyro_viking.linalg` (the numerical core, no Pyro),
:mod:`pyro_viking.distributions` (the distribution and its KL), :mod:`pyro_viking.model_trace`
(reading a Pyro model), :mod:`pyro_viking.infer` (the guide, the ELBO, the recipe),
:mod:`pyro_viking.nn` (Bayesian networks from ``nn.Module``), :mod:`pyro_viking.metrics`.
"""

from pyro_viking.distributions import KernelImageNormal
from pyro_viking.infer import (
    DEFAULT_BETA,
    AutoViking,
    BetaSelection,
    TraceViking_ELBO,
    VikingFit,
    fit_viking,
    select_beta,
    validation_nll,
)
from pyro_viking.linalg import DenseProjector, KernelProjector, MatrixFreeProjector
from pyro_viking.nn import BayesianNetwork, network_output

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BETA",
    "AutoViking",
    "BayesianNetwork",
    "BetaSelection",
    "DenseProjector",
    "KernelImageNormal",
    "KernelProjector",
    "MatrixFreeProjector",
    "TraceViking_ELBO",
    "VikingFit",
    "fit_viking",
    "network_output",
    "select_beta",
    "validation_nll",
]
