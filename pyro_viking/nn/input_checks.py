"""Checks of a Bayesian network's inputs, and the fix appended to torch's errors about them.

:class:`InputChecks` is the state these checks keep across calls: the last input tensor found
finite (so an unmodified training tensor passed at every step is scanned once) and the row shape
of the first successful network call (so a prediction input of another row shape gets the
reshape to make). :class:`LastChecked` is how a check remembers the tensor it passed.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["InputChecks", "LastChecked", "check_rows_match"]


def check_rows_match(x: Tensor, y: Optional[Tensor]) -> None:
    """``ValueError`` unless ``y`` is ``None`` or has one row per row of ``x``."""
    if y is not None and y.shape[:1] != x.shape[:1]:
        raise ValueError(f"x and y must have one row per datum: x has {x.shape[0]} rows, "
                         f"y has {y.shape[0] if y.dim() else 'none (a scalar)'}")


class LastChecked:
    """The last tensor a check passed, by identity and version (``x._version`` counts its
    in-place changes): the same, unmodified tensor need not be checked again. A weak
    reference: no tensor is kept alive, and none is saved with the check (pickling forgets)."""

    def __init__(self) -> None:
        self._last: Optional[tuple] = None  # (weakref, version)

    def __getstate__(self) -> dict:
        return {"_last": None}  # (a weakref: not picklable)

    def holds(self, x: Tensor) -> bool:
        """Whether ``x`` is the tensor last :meth:`remember`-ed, unmodified since."""
        last = self._last
        return last is not None and last[0]() is x and last[1] == x._version

    def remember(self, x: Tensor) -> None:
        """Keep (a weak reference to) ``x`` and its current version."""
        self._last = (weakref.ref(x), x._version)


class InputChecks:
    """The inputs' checks of one network and what they remember between calls."""

    def __init__(self) -> None:
        self._finite = LastChecked()  # the last x found finite
        self.row_shape: Optional[Tuple[int, ...]] = None  # x.shape[1:] of the first good call

    def check_finite(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming the rows when the inputs ``x`` ``(N, ...)`` hold NaN or
        inf. One pass over ``x`` per tensor version; non-float inputs are not checked."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            return
        if self._finite.holds(x):
            return
        rows = x.flatten(1) if x.dim() > 1 else x.reshape(-1, 1)  # (N, features), N may be 0
        finite = torch.isfinite(rows)
        if not bool(finite.all()):
            bad = (~finite.all(-1)).nonzero().flatten()
            shown = ", ".join(str(int(i)) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"x holds NaN or inf in {len(bad)} of its {len(finite)} rows "
                             f"(rows {shown}): drop or impute them before training or "
                             "predicting")
        self._finite.remember(x)

    def remember_rows(self, x: Tensor) -> None:
        """Keep ``x.shape[1:]`` as the row shape the network runs on, if none is kept yet."""
        if self.row_shape is None:
            self.row_shape = tuple(x.shape[1:])

    @contextmanager
    def explaining(self, x: Tensor, net: nn.Module) -> Iterator[None]:
        """Re-raise a ``RuntimeError`` of the block (``net`` running on ``x``) with
        :meth:`hint` appended, when there is one."""
        try:
            yield
        except RuntimeError as e:
            hint = self.hint(x, next(iter(net.parameters()), None), str(e))
            if hint is None:
                raise
            raise RuntimeError(f"{e}\n{hint}") from e

    def hint(self, x: Tensor, like: Optional[Tensor], error: str = "") -> Optional[str]:
        """What to do when the inputs' dtype or device differs from that of the network's
        parameter ``like`` (e.g. a float64 tensor made from a NumPy array), or, for torch's
        shape errors (``error``), when their rows' shape differs from :attr:`row_shape`;
        ``None`` otherwise."""
        if like is None or not torch.is_tensor(x):
            return None
        if x.is_floating_point() and x.dtype != like.dtype:
            return (f"BayesianNetwork: x is {x.dtype} but the network's parameters are "
                    f"{like.dtype}; pass x.to({like.dtype}) (NumPy arrays become float64 "
                    f"tensors), or convert the network before wrapping it (net.to({x.dtype})).")
        if x.device != like.device:
            return (f"BayesianNetwork: x is on {x.device} but the network is on {like.device}; "
                    f"pass x.to('{like.device}').")
        rows, known = tuple(x.shape[1:]), self.row_shape
        shape_error = "shape" in error or "size" in error
        if shape_error and known is not None and rows != known:
            want = ", ".join(str(n) for n in known)
            fix = (f", e.g. x.reshape(len(x), {want})"
                   if math.prod(rows) == math.prod(known) else "")
            return (f"BayesianNetwork: x has rows of shape {rows} (x is {tuple(x.shape)}) but "
                    f"the network ran on rows of shape {known} before; pass inputs "
                    f"of shape (N, {want}){fix}.")
        return None
