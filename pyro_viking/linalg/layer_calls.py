"""The records of :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`: one recorded layer
call (:class:`LayerCall`), the Jacobian pieces built from it (:class:`Ghost`, :class:`Block`),
and where a weight tensor lies in the flat vector ``z`` (:func:`z_offset`).

Shared by the recording (:mod:`~pyro_viking.linalg.layer_pieces`) and the per-layer rules
(:mod:`~pyro_viking.linalg.layer_rules`, :mod:`~pyro_viking.linalg.layer_rules_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Block", "Cols", "Ghost", "LayerCall", "LayerGramNotApplicable", "col_range",
           "default_check_tol", "z_offset"]

Cols = Union[slice, Tensor]


class LayerGramNotApplicable(NotImplementedError):
    """The model is outside what :class:`LayerGramJacobian` computes exactly."""


@dataclass
class LayerCall:
    """One recorded layer call: its input ``x`` (detached unless the graph is kept; a norm's
    normalised input x̂, an embedding's indices), its graph-connected output ``out`` (leading
    data dimension B), and the first columns of z of its weight and bias (``None``: not in z).

    ``rule`` names the per-datum gradient (:func:`~pyro_viking.linalg.layer_rules.layer_blocks`):
    ``"linear"`` (``Σ_t g_t x_tᵀ``), ``"conv"``, ``"affine"`` (a norm's ``γ ⊙ x̂ + β``) or
    ``"embedding"`` (a lookup)."""

    module: nn.Module
    x: Tensor
    out: Tensor
    w_start: Optional[int]
    b_start: Optional[int]
    x_version: int
    w_shape: Tuple[int, ...]
    rule: str = "linear"


@dataclass
class Ghost:
    """Weight of a Linear layer on (B, in) inputs: per-example gradient ``g_i a_iᵀ``, and its
    bias (per-example gradient ``g_i``) when ``bias_cols`` is set, so that the layer's Gram is
    the one Hadamard product ``(G Gᵀ) ⊙ (A Aᵀ + 1)``. On (B, T, in) inputs the per-example
    gradient is ``Σ_t g_it a_itᵀ`` and the Hadamard product runs over the B·T positions, summed
    over each pair of data's T × T position pairs."""

    A: Tensor  # (B, in) or (B, T, in)
    G: Tensor  # (B, out) or (B, T, out)
    cols: slice  # out*in columns, row-major (out, in)
    bias_cols: Optional[slice] = None  # out columns


@dataclass
class Block:
    """An explicit ``(B, n)`` Jacobian block on columns ``cols`` of z. ``span``: the columns
    the layer owns when ``cols`` lists only some of them (an embedding's rows used by the
    batch); its other columns are zero columns of J."""

    cols: Cols
    J: Tensor
    span: Optional[slice] = None


def col_range(piece: Union[Ghost, Block]) -> Tuple[int, int]:
    """``[start, stop)`` of the columns of z owned by a ghost's weight or a slice block."""
    cols = piece.span if isinstance(piece, Block) and piece.span is not None else piece.cols
    return cols.start, cols.stop


def _depends_on(t: Tensor, z: Tensor) -> bool:
    """Whether the autograd graph of ``t`` reaches the leaf ``z``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is z:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def z_offset(t: Optional[Tensor], z: Tensor, what: str) -> Optional[int]:
    """First column of z occupied by ``t`` (a contiguous row-major view of z), or ``None``
    when ``t`` does not depend on z (a constant); :class:`LayerGramNotApplicable` for a tensor
    computed from z or a non-contiguous view of it."""
    if t is None:
        return None
    try:
        shares = t.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError) as e:  # functorch-wrapped tensors
        raise LayerGramNotApplicable(f"{what} has no storage ({e})") from e
    start = t.storage_offset() - z.storage_offset()
    if shares and start < z.numel() and start + t.numel() > 0:  # overlaps z
        if t.dtype != z.dtype or not t.is_contiguous() or start < 0 \
                or start + t.numel() > z.numel():
            raise LayerGramNotApplicable(
                f"{what} is a non-contiguous or reinterpreted view of z (shape "
                f"{tuple(t.shape)}, strides {t.stride()}); slice z with z[a:b].view(shape)")
        return start
    if t.grad_fn is not None and _depends_on(t, z):
        raise LayerGramNotApplicable(
            f"{what} is computed from z (grad_fn {type(t.grad_fn).__name__}) rather than being "
            "a view of it; pass the weights as z[a:b].view(shape)")
    return None


def default_check_tol(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``."""
    return math.sqrt(torch.finfo(dtype).eps)
