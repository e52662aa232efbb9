"""Cross-Gram matrices ``J_a J_bᵀ`` of two per-example Jacobians of one batch at one point, e.g.
the rows of the observed labels and of labels drawn from the model (the Monte Carlo Fisher of
``pyro_viking.infer.recipe.scale_init``), in float64.

Two layer-Gram operators of the same layers (pieces on the same columns of z) give it from their
pieces, layer by layer, without forming either Jacobian: ``(G_a G_bᵀ) ⊙ (A_a A_bᵀ [+ 1])`` per
ghost (over the positions of a sequence and summed over position pairs) and ``J_a J_bᵀ`` per
explicit block. Any other pair is multiplied densely.
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor

from pyro_viking.linalg.layer_calls import Block, Ghost
from pyro_viking.linalg.layer_gram import LayerGramJacobian, select_jacobian_backend
from pyro_viking.linalg.layer_pieces import pieces_gram
from pyro_viking.linalg.operators import JacobianOperator
from pyro_viking.linalg.per_example import PerExampleJacobian

__all__ = ["batch_jacobian", "cross_gram", "dense64", "pieces_match"]


def batch_jacobian(rows: Callable[[Tensor], Tensor], z: Tensor) -> JacobianOperator:
    """The per-example Jacobian of ``rows`` ``(D,) -> (B,)`` at ``z`` by the backend a guide's
    projector picks (:func:`~pyro_viking.linalg.layer_gram.select_jacobian_backend`: the layer
    Gram where it applies, else the dense one), and the dense one (vmapped where possible) where
    that rule would choose the matrix-free route, which has no Gram."""
    jac = select_jacobian_backend(rows, z)
    return PerExampleJacobian(rows, z, vectorize=True) if jac is None else jac


def dense64(jac: JacobianOperator) -> Tensor:
    """``J`` ``(B, D)`` in float64 (a layer-Gram operator's rows ``I J``, exact copies of its
    entries)."""
    if isinstance(jac, PerExampleJacobian):
        return jac.J.double()
    eye = torch.eye(jac.shape[0], dtype=jac.dtype, device=jac.device)
    return jac.rmv(eye).double()


def _same_cols(a, b) -> bool:
    if isinstance(a, slice) or isinstance(b, slice) or a is None or b is None:
        return a == b
    return a.shape == b.shape and bool(torch.equal(a, b))


def _same_layers(mine: List, theirs: List) -> bool:
    if len(mine) != len(theirs):
        return False
    for p, q in zip(mine, theirs):
        if type(p) is not type(q) or not _same_cols(p.cols, q.cols):
            return False
        if isinstance(p, Ghost) and (p.A.shape != q.A.shape or p.G.shape != q.G.shape
                                     or p.bias_cols != q.bias_cols):
            return False
        if isinstance(p, Block) and p.J.shape != q.J.shape:
            return False
    return True


def pieces_match(a: LayerGramJacobian, b: LayerGramJacobian) -> bool:
    """Whether two layer-Gram operators have the same layers: as many rows, and ghosts and
    blocks one for one on the same columns with the same shapes."""
    (ga, ba), (gb, bb) = a.pieces, b.pieces
    return a.shape == b.shape and _same_layers(ga, gb) and _same_layers(ba, bb)


def cross_gram(a: JacobianOperator, b: JacobianOperator) -> Tensor:
    """``J_a J_bᵀ`` ``(B, B)`` in float64 (module docstring)."""
    if isinstance(a, LayerGramJacobian) and isinstance(b, LayerGramJacobian) \
            and pieces_match(a, b):
        return pieces_gram(*a.pieces, a.shape[0], a.device, other=b.pieces)
    return dense64(a) @ dense64(b).T
