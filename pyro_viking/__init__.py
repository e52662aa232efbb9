"""pyro_viking: VIKING (kernel/image Gaussian) variational inference for Pyro models.

``q(θ) = N(θ̂, σ_ker² P + σ_im² (I − P))`` with ``P`` the projector onto the kernel of the
per-datum loss Jacobian (Fadel et al., NeurIPS 2025).
"""

from .autoguide import AutoViking
from .beta_selection import BetaSelection, select_beta, validation_nll
from .bnn import BayesianNetwork
from .distributions import KernelImageNormal
from .elbo import TraceViking_ELBO
from .linalg import DenseProjector, KernelProjector, MatrixFreeProjector
from .linearization import network_output
from .recipe import DEFAULT_BETA, VikingFit, fit_viking

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
