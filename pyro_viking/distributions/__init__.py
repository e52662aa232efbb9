"""The VIKING distribution and its closed-form KL divergences."""

from pyro_viking.distributions.kernel_image_normal import (
    RANK_ESTIMATORS,
    KernelImageNormal,
    KernelImageNormalBase,
    marginal_variance,
)
from pyro_viking.distributions.kl import kl_kernel_image_normal_diag

__all__ = ["KernelImageNormal", "KernelImageNormalBase", "RANK_ESTIMATORS",
           "kl_kernel_image_normal_diag", "marginal_variance"]
