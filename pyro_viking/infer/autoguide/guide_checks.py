"""The checks of :class:`~pyro_viking.AutoViking`'s initial values, of Pyro's param store at its
set-up, and of its parameters at each call: each raises a ``ValueError`` that says the fix."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pyro_viking.model_trace.layout import LatentLayout

__all__ = ["check_finite_init", "check_parameters", "check_stored_loc"]


def check_finite_init(layout: LatentLayout, init_loc: Tensor) -> None:
    """Raise when the initial ``loc`` ``(D,)`` is not finite, naming the latents where."""
    if bool(torch.isfinite(init_loc).all()):
        return
    bad = [n for n, part in zip(layout.names, layout.split(init_loc))
           if not bool(torch.isfinite(part).all())]
    raise ValueError(
        f"AutoViking's initial values are not finite at {', '.join(bad)} (from its "
        "init_loc_fn; e.g. init_to_mean of a HalfCauchy, whose mean is infinite): pass "
        "init_loc_fn=init_to_median or init_to_feasible, or init_to_value with finite "
        "values.")


def check_stored_loc(stored: Tensor, init_loc: Tensor, param_name: str,
                     names: Sequence[str]) -> None:
    """Raise when Pyro's param store already holds ``param_name`` with a shape other than this
    model's ``loc`` (another model's guide of the same name)."""
    if stored.shape != init_loc.shape:
        raise ValueError(
            f"Pyro's param store already holds '{param_name}' of shape "
            f"{tuple(stored.shape)}, but this model's latents ({', '.join(names)}"
            f") need {tuple(init_loc.shape)}: it is another model's (Pyro names an "
            "autoguide's parameters after its class). Call pyro.clear_param_store() before "
            "fitting a new model.")


def check_parameters(*params: Tensor) -> None:
    """Raise a ``ValueError`` that says what to do when a guide parameter is not finite."""
    if not all(bool(torch.isfinite(t.detach().sum())) for t in params):
        raise ValueError("AutoViking's parameters are not finite (loc, image_scale or "
                         "kernel_scale is NaN/inf): training diverged. Lower the learning rate "
                         "(or clip gradients, e.g. ClippedAdam) and start again.")
