"""pyro_viking: VIKING (kernel/image Gaussian) variational inference for Pyro models.

``q(θ) = N(θ̂, σ_ker² P + σ_im² (I − P))`` with ``P`` the projector onto the kernel of the
per-datum loss Jacobian (Fadel et al., NeurIPS 2025).
"""

from .autoguide import AutoViking
from .bnn import BayesianNetwork
from .distributions import KernelImageNormal
from .elbo import TraceViking_ELBO
from .linalg import DenseProjector, KernelProjector, MatrixFreeProjector
from .linearization import network_output

__version__ = "0.1.0"

__all__ = [
    "AutoViking",
    "BayesianNetwork",
    "DenseProjector",
    "KernelImageNormal",
    "KernelProjector",
    "MatrixFreeProjector",
    "TraceViking_ELBO",
    "network_output",
]
