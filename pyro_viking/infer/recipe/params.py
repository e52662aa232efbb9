"""The Pyro params the VIKING recipe handles itself: which one is a learned prior scale, hiding
it from the optimiser, setting a positive param's value in the param store, and a learning rate
of its own for the scale params."""

from __future__ import annotations

from typing import Callable, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.optim import PyroOptim
from torch.distributions import constraints

__all__ = ["hide_param", "prior_scale_name", "set_positive_param", "with_scale_lr"]


def prior_scale_name(model: Callable, prior_scale_param: Optional[str]) -> Optional[str]:
    """The name of the ``pyro.param`` holding the prior's scale: ``prior_scale_param`` if given,
    else the model's ``prior_scale_name`` (a :class:`~pyro_viking.BayesianNetwork` with a
    learned prior scale has one), else ``None`` (a fixed prior scale)."""
    if prior_scale_param is not None:
        return prior_scale_param
    return getattr(model, "prior_scale_name", None)


def hide_param(fn: Callable, name: Optional[str]) -> Callable:
    """``fn`` with the ``pyro.param`` ``name`` hidden from SVI (so no optimiser moves it)."""
    return fn if name is None else poutine.block(fn, hide=[name])


def set_positive_param(name: str, value: float, like: torch.Tensor) -> None:
    """Set the positive ``pyro.param`` ``name`` to ``value`` in the param store (created with
    ``like``'s dtype and device when the model has not run yet, e.g. MAP values given)."""
    store = pyro.get_param_store()
    if name in store:
        old = store[name]
        store[name] = torch.tensor(value, dtype=old.dtype, device=old.device)
        store[name].unconstrained().grad = None
    else:
        pyro.param(name, torch.tensor(value, dtype=like.dtype, device=like.device),
                   constraint=constraints.positive)


def with_scale_lr(optim: PyroOptim, factor: float, is_scale: Callable[[str], bool]) -> PyroOptim:
    """A copy of ``optim`` whose learning rate is multiplied by ``factor`` for scale params."""
    base = optim.pt_optim_args

    def args(name: str) -> dict:
        a = dict(base(name) if callable(base) else base)
        if is_scale(name) and "lr" in a:
            a["lr"] = a["lr"] * factor
        return a

    return PyroOptim(optim.pt_optim_constructor, args, optim.pt_clip_args)
