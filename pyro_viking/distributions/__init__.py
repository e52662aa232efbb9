"""The VIKING distribution and its closed-form KL divergences."""

from .kernel_image_normal import RANK_ESTIMATORS, KernelImageNormal, marginal_variance
from .kl import kl_kernel_image_normal_diag

__all__ = ["KernelImageNormal", "RANK_ESTIMATORS", "kl_kernel_image_normal_diag",
           "marginal_variance"]
