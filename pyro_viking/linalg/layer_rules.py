"""Per-layer rules of :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`: which module
calls are recorded (:func:`record_call`) and the per-datum Jacobian pieces of each
(:func:`layer_blocks`), from the layer input ``x`` and the output gradient ``G = ∂(Σ_i
rows_i)/∂out`` (row ``i`` only depends on datum ``i``, so ``G_i`` is datum i's own gradient).

* ``nn.Linear`` on ``(B, in)``: a ghost ``(A, G)``; on ``(B, …, in)`` (T positions): datum
  i's row is ``Σ_t g_{it} x_{it}ᵀ`` (and ``Σ_t g_{it}`` for the bias), kept as a ghost
  ``(A, G)`` ``(B, T, ·)`` over the positions when ``(B·T)² ≤ B·out·in`` (its Gram
  ``Σ_{t,s} (g_{it}·g_{js})(x_{it}·x_{js} [+ 1])`` needs a ``(B·T)²`` temporary), else
  materialised as the block ``(B, out·in)``.
* ``nn.Conv{1,2,3}d`` (``groups=1``, zero padding): one weight-gradient convolution with the
  batch folded into the groups ``(B, C_out·C·∏k)``, bias ``Σ_s g_{ics}``.
* Norms with an elementwise affine ``γ ⊙ x̂ + β`` — eval-mode batch norm (running statistics),
  ``nn.GroupNorm``, ``nn.LayerNorm``, ``nn.RMSNorm``: x̂ is recomputed from the input without
  the affine, and the rows are ``Σ_s G_{is} ⊙ x̂_{is}`` (γ) and ``Σ_s G_{is}`` (β) ``(B, |γ|)``,
  ``s`` running over the positions the parameter is broadcast along (spatial positions for the
  per-channel norms, leading positions for the trailing ``normalized_shape`` ones).
* ``nn.Embedding`` (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``): datum i's gradient
  w.r.t. the table is the scatter ``Σ_p e_{t_{ip}} g_{ip}ᵀ`` of its output gradients into the
  rows of its tokens ``t_{ip}`` (the ``padding_idx`` row excluded, as in autograd). Only the
  ``U`` distinct tokens of the batch have non-zero columns: the block is ``(B, U·E)`` on those
  rows' columns, so ``(J Jᵀ)_{ij} = Σ_{p,q: t_{ip} = t_{jq}} ⟨g_{ip}, g_{jq}⟩``.

``nn.MultiheadAttention`` has its own rule (:mod:`~pyro_viking.linalg.layer_rules_attention`).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_viking.linalg.layer_calls import (
    Block,
    Ghost,
    LayerCall,
    LayerGramNotApplicable,
    z_offset,
)

__all__ = ["AFFINE_NORMS", "CONVS", "layer_blocks", "record_call"]

#: convolutions whose per-example weight gradients are one grouped weight-gradient convolution
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: norms with a per-channel affine (parameter shape ``(C,)``, input ``(B, C, *spatial)``)
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
#: norms with an affine over the trailing ``normalized_shape`` of the input
_TRAILING_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: norms recorded as ``γ ⊙ x̂ + β`` (batch norm in eval mode only)
AFFINE_NORMS = _CHANNEL_NORMS + _TRAILING_NORMS


def _rule_of(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CONVS):
        return "conv"
    if isinstance(module, AFFINE_NORMS):
        return "affine"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _refuse_options(module: nn.Module, name: str) -> None:
    if isinstance(module, CONVS) and (module.groups != 1 or module.padding_mode != "zeros"):
        raise LayerGramNotApplicable(f"{name} needs groups=1 and padding_mode='zeros'")
    if isinstance(module, nn.Embedding) and (module.max_norm is not None
                                             or module.scale_grad_by_freq or module.sparse):
        raise LayerGramNotApplicable(
            f"{name} with max_norm (renormalises its table in place), scale_grad_by_freq "
            "(a gradient that depends on the batch) or sparse gradients")


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    """x̂: the input of the norm's elementwise affine map, same shape as ``x``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode: running statistics
        return F.batch_norm(x, module.running_mean, module.running_var, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return F.rms_norm(x, module.normalized_shape, eps=module.eps)


def record_call(module: nn.Module, args: Sequence, output: Any, z: Tensor,
                keep_graph: bool) -> Optional[LayerCall]:
    """The :class:`LayerCall` of ``module(*args) = output`` when the module has a rule and a
    weight or bias in z (``None`` otherwise); :class:`LayerGramNotApplicable` for options
    without an exact rule."""
    rule = _rule_of(module)
    if rule is None:
        return None
    name = type(module).__name__
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    w = z_offset(weight, z, f"the weight of {name}")
    b = z_offset(bias, z, f"the bias of {name}")
    if w is None and b is None:
        return None
    _refuse_options(module, name)
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not isinstance(output, Tensor):
        raise LayerGramNotApplicable(f"{name} called without a tensor input/output")
    if rule == "affine":
        x = _normalised(module, x)
    shape = tuple((weight if weight is not None else bias).shape)
    return LayerCall(module, x if keep_graph else x.detach(), output, w, b, x._version, shape,
                     rule)


# --------------------------------------------------------------------------- layer blocks
def _conv_weight_grads(conv: nn.Module, x: Tensor, G: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, C_out, C·∏k)`` of an n-d convolution (n = 1, 2, 3)
    with input ``x`` ``(B, C, *spatial)`` and output gradient ``G`` ``(B, C_out, *spatial')``.

    One weight-gradient convolution with the batch folded into the groups (input
    ``(1, B·C, *spatial)``, ``B`` groups): ``B·|W|·L`` work like ``bmm(G, unfold(x)ᵀ)``, without
    materialising the ``(B, C·∏k, L)`` patches.
    """
    k, d, s, pad = conv.kernel_size, conv.dilation, conv.stride, conv.padding
    nd = len(k)
    if isinstance(pad, str):
        if pad == "same":  # PyTorch puts the odd pixel on the right/bottom; F.pad: last dim first
            tot = [d[i] * (k[i] - 1) for i in range(nd)]
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (tot[i] // 2,
                                                                   tot[i] - tot[i] // 2)])
        pad = (0,) * nd
    B, C = x.shape[:2]
    c_out = G.shape[1]
    weight = G.new_empty(1).expand(B * c_out, C, *k)
    W = torch.ops.aten.convolution_backward(
        G.reshape(1, B * c_out, *G.shape[2:]), x.reshape(1, B * C, *x.shape[2:]), weight, None,
        s, pad, d, False, [0] * nd, B, (False, True, False))[1]
    return W.reshape(B, c_out, -1)


def _sum_dims(t: Tensor, dims: Tuple[int, ...]) -> Tensor:
    return t.sum(dims) if dims else t  # (a sum over an empty tuple would sum every dim)


def _affine_rows(c: LayerCall, G: Tensor) -> Tuple[Tensor, Tensor]:
    """``(Σ_s G ⊙ x̂, Σ_s G)``, each ``(B, *w_shape)``: the rows of γ and β."""
    if isinstance(c.module, _CHANNEL_NORMS):
        dims = tuple(range(2, G.dim()))
    else:
        dims = tuple(range(1, G.dim() - len(c.w_shape)))
    W = _sum_dims(G * c.x, dims) if G.shape == c.x.shape else None
    if W is None or tuple(W.shape[1:]) != c.w_shape:
        raise LayerGramNotApplicable(
            f"{type(c.module).__name__} output {tuple(G.shape)} does not carry its affine "
            f"parameters {c.w_shape} on the expected dimensions")
    return W, _sum_dims(G, dims)


def _embedding_block(c: LayerCall, G: Tensor, B: int) -> Block:
    """The ``(B, U·E)`` block of the ``U`` distinct tokens of the batch (module docstring)."""
    num, E = c.w_shape
    idx = c.x.reshape(B, -1)
    Gr = G.reshape(B, -1, E)
    if Gr.shape[1] != idx.shape[1]:
        raise LayerGramNotApplicable(f"Embedding output {tuple(G.shape)} does not match its "
                                     f"indices {tuple(c.x.shape)}")
    pad = c.module.padding_idx
    if pad is not None:  # autograd gives the padding row no gradient
        Gr = Gr * (idx != pad).unsqueeze(-1).to(Gr.dtype)
    tokens, inv = torch.unique(idx, return_inverse=True)
    S = Gr.new_zeros(B, tokens.numel(), E).scatter_add(1, inv.unsqueeze(-1).expand_as(Gr), Gr)
    cols = (c.w_start + tokens[:, None] * E + torch.arange(E, device=idx.device)).reshape(-1)
    return Block(cols, S.reshape(B, -1), span=slice(c.w_start, c.w_start + num * E))


def layer_blocks(c: LayerCall, G: Tensor, B: int) -> Tuple[List[Ghost], List[Block]]:
    """Jacobian pieces of one recorded call with output gradient ``G`` (``B`` rows): a ghost
    (Linear on 2-D input) or explicit blocks (module docstring)."""
    out, nw = c.w_shape[0], math.prod(c.w_shape)
    wcols = None if c.w_start is None else slice(c.w_start, c.w_start + nw)
    bcols = None if c.b_start is None else slice(c.b_start, c.b_start + out)
    if c.rule == "affine":
        W, Gb = _affine_rows(c, G)
        bcols = None if c.b_start is None else slice(c.b_start, c.b_start + nw)
    elif c.rule == "embedding":
        return [], [_embedding_block(c, G, B)]
    elif c.rule == "linear" and c.x.dim() == 2:
        if wcols is not None:
            return [Ghost(c.x, G, wcols, bcols)], []
        W, Gb = None, G
    elif c.rule == "conv":
        nd = len(c.module.kernel_size)
        if G.dim() != 2 + nd:
            raise LayerGramNotApplicable(f"{type(c.module).__name__} output is not "
                                         f"(B, C_out, {nd} spatial dims)")
        W = None if wcols is None else _conv_weight_grads(c.module, c.x, G)  # (B, C_out, C·∏k)
        Gb = G.sum(tuple(range(2, 2 + nd)))
    else:  # linear on (B, ..., in): sum over the T extra positions
        A, Gr = c.x.reshape(B, -1, c.x.shape[-1]), G.reshape(B, -1, out)
        if wcols is not None and B * A.shape[1] ** 2 <= nw:  # (B·T)² ≤ B·out·in numbers
            return [Ghost(A, Gr, wcols, bcols)], []
        W = None if wcols is None else torch.bmm(Gr.transpose(1, 2), A)  # (B, out, in)
        Gb = Gr.sum(1)
    blocks = [] if wcols is None else [Block(wcols, W.reshape(B, nw))]
    if bcols is not None:
        blocks.append(Block(bcols, Gb.reshape(B, -1)))
    return [], blocks
