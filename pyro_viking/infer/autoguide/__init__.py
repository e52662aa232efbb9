"""The VIKING guide: :class:`AutoViking`, the sampling state it carries across calls, the
posteriors it returns, the σ_ker policy and the choice of the Jacobian backend and solver."""

from pyro_viking.infer.autoguide.guide import AutoViking

__all__ = ["AutoViking"]
