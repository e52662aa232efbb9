"""Positive scales that are either fixed or learned: the prior's ``s`` and the noise's ``σ``.

A scale argument is a positive float (kept fixed) or ``"learned"`` (a ``pyro.param`` with a
positive constraint, created at its initial value on first use).
"""

from __future__ import annotations

from typing import Optional, Union

import pyro
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = ["LEARNED", "parse_scale", "scale_value"]

LEARNED = "learned"


def parse_scale(value: Union[float, str], what: str) -> Optional[float]:
    """``None`` for ``"learned"``, else ``value`` as a float; ``ValueError`` unless positive."""
    if value == LEARNED:
        return None
    if isinstance(value, str) or not float(value) > 0:
        raise ValueError(f"{what} must be a positive float or '{LEARNED}', got {value!r}")
    return float(value)


def scale_value(value: Optional[float], name: Optional[str], init: float, like: Tensor) -> Tensor:
    """The scale now, a 0-dim tensor of ``like``'s dtype and device: the fixed ``value``, or
    (``value is None``) the positive ``pyro.param`` ``name`` initialised at ``init``."""
    if value is not None:
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    init_t = torch.tensor(init, dtype=like.dtype, device=like.device)
    return pyro.param(name, init_t, constraint=constraints.positive)
