"""Inference: the VIKING guide, its ELBO (traced and fused steps) and the training recipe."""

from pyro_viking.infer.autoguide import AutoViking
from pyro_viking.infer.elbo import TraceViking_ELBO
from pyro_viking.infer.recipe import (
    DEFAULT_BETA,
    BetaSelection,
    VikingFit,
    fit_viking,
    select_beta,
    validation_nll,
)

__all__ = ["DEFAULT_BETA", "AutoViking", "BetaSelection", "TraceViking_ELBO", "VikingFit",
           "fit_viking", "select_beta", "validation_nll"]
