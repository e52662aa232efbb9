"""Checks of a Bayesian network's outputs and labels against its likelihood.

* The network returns one tensor ``(B, O)``; ``(B,)`` is one output per datum, ``(B, 1)``, for
  the likelihoods with one output (``"binary"``, ``"regression"``), and refused for
  ``"classification"``, whose logits are ``(B, C)`` with ``C ≥ 2`` (:func:`likelihood_outputs`).
* The labels/targets ``y`` ``(N, ...)`` fit the outputs in shape and dtype
  (:func:`check_target_shape`) and their values the likelihood's support: class indices
  ``0..C-1``, binary labels 0 or 1 (:func:`check_label_values`).

:class:`TargetChecks` is the state these checks keep across calls: the output width ``O`` of the
network's last call, and the last label tensor that passed (an unmodified training tensor, passed
at every step, is scanned once: on the first call with it, so a bad label is found whatever
minibatch the step draws).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from pyro_viking.nn.input_checks import LastChecked

__all__ = ["TargetChecks", "check_label_values", "check_target_shape", "likelihood_outputs",
           "one_tensor"]


def one_tensor(out: Any) -> Tensor:
    """``out`` (a network's output), or ``TypeError`` with the fix unless it is one tensor."""
    if not torch.is_tensor(out):
        raise TypeError(
            f"the network must return one tensor (the logits, or the predicted values), but it "
            f"returned a {type(out).__name__}: wrap it in an nn.Module whose forward returns "
            f"that tensor alone (e.g. `return self.net(x)[0]` or `return self.net(x)['logits']`)")
    return out


def likelihood_outputs(likelihood: str, out: Tensor) -> Tensor:
    """The outputs ``out`` of one weight sample as the likelihood reads them: ``(B, O)`` as
    they are, ``(B,)`` as ``(B, 1)`` for ``"binary"`` and ``"regression"``. ``ValueError``,
    naming the shape and the fix, for classification logits that are not ``(B, C ≥ 2)`` and
    binary outputs that are not ``(B, 1)``."""
    shape = tuple(out.shape)
    if likelihood == "classification":
        if out.dim() < 2 or shape[-1] < 2:
            raise ValueError(
                f"likelihood='classification' needs logits of shape (B, C), one score per class "
                f"with C ≥ 2, but the network returned shape {shape}: return (B, C) logits, or, "
                "for two classes, use likelihood='binary' with one logit per datum and 0./1. "
                "labels")
        return out
    if out.dim() == 1:
        return out.unsqueeze(-1)  # one output per datum
    if likelihood == "binary" and shape[-1] != 1:
        raise ValueError(f"likelihood='binary' needs outputs (B, 1) (or (B,)), got {shape}; "
                         "for C ≥ 2 classes use likelihood='classification' with (B, C) logits")
    return out


def check_target_shape(likelihood: str, y: Tensor, width: int) -> None:
    """Raise ``ValueError``, with the fix, if the labels/targets ``y`` ``(N, ...)`` do not fit
    the likelihood and outputs ``(B, width)`` in shape (or in dtype, for binary labels)."""
    if likelihood == "regression" and width > 1:
        want, what = (width,), f"targets (N, {width}) for outputs (B, {width})"
    else:
        want = ()
        what = {"classification": "class indices of shape (N,)",
                "binary": "0./1. labels of shape (N,)",
                "regression": "targets of shape (N,) for outputs (B, 1)"}[likelihood]
    shape = tuple(y.shape[1:])
    if shape != want:
        fix = " (y.squeeze(-1))" if shape == (1,) and want == () else ""
        raise ValueError(f"likelihood={likelihood!r} takes {what}; got y of shape "
                         f"{tuple(y.shape)}{fix}")
    if likelihood == "binary" and not y.is_floating_point():
        raise ValueError(f"likelihood='binary' takes float labels (0. or 1.); got {y.dtype}"
                         ": pass y.float() (or y.to(x.dtype))")


def check_label_values(likelihood: str, y: Tensor, width: int) -> None:
    """Raise ``ValueError`` naming the first bad row, its value and the valid labels if the
    labels ``y`` ``(N,)`` hold a value outside the likelihood's support: class indices
    ``0..width-1`` (PyTorch's ``ignore_index`` −100 included: no row is skipped here), binary
    labels 0 or 1. Regression targets are not checked."""
    if likelihood == "classification":
        bad = (y < 0) | (y >= width) | (y != y)  # (y != y: NaN in float labels)
        want = f"class indices 0..{width - 1} (the network returns {width} class scores)"
        fix = ("Drop or relabel those rows, or give the network's last layer one output per "
               "class")
    elif likelihood == "binary":
        bad = (y != 0) & (y != 1)
        want, fix = "labels 0 or 1", "Map them to 0./1. (e.g. y = (y > 0).float())"
    else:
        return
    rows = bad.nonzero().flatten()
    if len(rows):
        first = int(rows[0])
        value = y[first].item()
        value = int(value) if float(value).is_integer() else value
        raise ValueError(f"likelihood={likelihood!r} takes {want}, but y holds other values in "
                         f"{len(rows)} of its {len(y)} rows: row {first} is {value}. {fix}")


class TargetChecks:
    """The label checks of one network and what they remember between calls."""

    def __init__(self) -> None:
        self.width: Optional[int] = None  # O of the network's outputs (B, O), once it has run
        self._passed = LastChecked()  # the last y found to fit

    def remember_outputs(self, out: Tensor) -> None:
        """Keep the output width ``O`` of the network's outputs ``out`` ``(..., B, O)``."""
        self.width = int(out.shape[-1])

    def check(self, likelihood: str, y: Optional[Tensor]) -> None:
        """:func:`check_target_shape` and :func:`check_label_values` for the whole of ``y``
        ``(N, ...)``, once per tensor version; nothing for ``y=None`` or before the network's
        first call (its output width is not known yet)."""
        if y is None or self.width is None or self._passed.holds(y):
            return
        check_target_shape(likelihood, y, self.width)
        check_label_values(likelihood, y, self.width)
        self._passed.remember(y)
