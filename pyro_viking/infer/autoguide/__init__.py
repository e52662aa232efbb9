"""The VIKING guide: :class:`AutoViking`, the sampling state it carries across calls, the
posteriors it returns, the σ_ker policy, the choice of the Jacobian backend and solver, the
projection of samples on the training data, and the checks of its set-up."""

from pyro_viking.infer.autoguide.guide import AutoViking

__all__ = ["AutoViking"]
