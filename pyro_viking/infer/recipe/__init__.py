"""The training recipe: :func:`fit_viking` (MAP warm-up, closed-form scales from the curvature
at the MAP, then the ELBO; one module per phase) and :func:`select_beta` (the KL weight on a
validation split)."""

from pyro_viking.infer.recipe.beta_selection import BetaSelection, select_beta, validation_nll
from pyro_viking.infer.recipe.fit import DEFAULT_BETA, VikingFit, fit_viking

__all__ = ["DEFAULT_BETA", "BetaSelection", "VikingFit", "fit_viking", "select_beta",
           "validation_nll"]
