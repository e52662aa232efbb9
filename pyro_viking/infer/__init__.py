"""Inference: the VIKING guide, its ELBO (traced and fused steps), the training recipe and the
multi-process launcher."""

from pyro_viking.infer.autoguide import AutoViking
from pyro_viking.infer.elbo import TraceViking_ELBO
from pyro_viking.infer.launch import WorkerError, launch
from pyro_viking.infer.recipe import (
    DEFAULT_BETA,
    BetaSelection,
    VikingFit,
    fit_viking,
    select_beta,
    validation_nll,
)

__all__ = ["DEFAULT_BETA", "AutoViking", "BetaSelection", "TraceViking_ELBO", "VikingFit",
           "WorkerError", "fit_viking", "launch", "select_beta", "validation_nll"]
