"""The layer-Gram rule of ``nn.MultiheadAttention``: its projections are linear layers on
sequences, applied inside ``F.multi_head_attention_forward`` (not as modules), so the recorder
recomputes the attention from the module's inputs and hands the network that result.

With inputs ``X_q (B, T, E)``, ``X_k, X_v (B, S, ·)`` (batch first), heads ``h = 1..H`` of width
``d = E/H`` and the additive mask ``M`` (attention and key-padding masks, ``-inf`` where
masked):

    Q = X_q W_qᵀ + b_q,  K = X_k W_kᵀ + b_k,  V = X_v W_vᵀ + b_v          (in_proj)
    O_h = softmax(Q_h K_hᵀ / √d + M) V_h,  O = [O_1 … O_H]  (B, T, E)
    out = O W_oᵀ + b_o                                                   (out_proj)

Each projection is then the "linear on ``(B, …, in)``" rule of
:mod:`~pyro_viking.linalg.layer_rules`: datum i's gradient of ``W_q`` is ``Σ_t g^Q_{it}
x_{q,it}ᵀ`` with ``g^Q = ∂(Σ rows)/∂Q``, the same for ``K``, ``V`` and ``W_o`` (input ``O``).
For self-attention on one tensor with the packed ``in_proj_weight`` ``(3E, E)`` the three are
one call ``[Q K V] = X W_inᵀ + b_in`` ``(B, T, 3E)``.

The recomputed output is compared with the module's own (relative ``sqrt(eps)``): options it
does not reproduce (``add_bias_kv``, ``add_zero_attn``, dropout in training, unbatched inputs, a
hint ``is_causal`` whose mask is not causal) raise
:class:`~pyro_viking.linalg.layer_calls.LayerGramNotApplicable`, and the caller falls back.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_viking.linalg.layer_calls import (
    LayerCall,
    LayerGramNotApplicable,
    default_check_tol,
    z_offset,
)

__all__ = ["attention_calls"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _parameters(m: nn.MultiheadAttention) -> List[Optional[Tensor]]:
    return [m.in_proj_weight, m.in_proj_bias, m.q_proj_weight, m.k_proj_weight,
            m.v_proj_weight, m.out_proj.weight, m.out_proj.bias, m.bias_k, m.bias_v]


def _additive(mask: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A boolean mask (``True``: not attended) as ``0 / -inf``; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf"))
    return mask.to(like.dtype)


def _mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int,
          like: Tensor) -> Optional[Tensor]:
    """The additive mask ``(B or 1, H or 1, T, S)``."""
    a, k = _additive(attn_mask, like), _additive(key_padding_mask, like)
    if a is not None:
        a = a.reshape(1, 1, *a.shape) if a.dim() == 2 else a.reshape(B, H, *a.shape[1:])
    if k is not None:
        k = k.reshape(B, 1, 1, k.shape[-1])
    return k if a is None else a if k is None else a + k


def _projections(m: nn.MultiheadAttention, q_in: Tensor, k_in: Tensor, v_in: Tensor,
                 same: bool) -> List[Tuple[Tensor, Optional[Tensor], Optional[Tensor], str]]:
    """``(input, weight, bias, name)`` of each in-projection (one when packed and ``same``)."""
    b = m.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    if m._qkv_same_embed_dim:
        if same:
            return [(q_in, m.in_proj_weight, b, "in_proj")]
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    return [(q_in, wq, bq, "q projection"), (k_in, wk, bk, "k projection"),
            (v_in, wv, bv, "v projection")]


def _call(m: nn.Module, x: Tensor, out: Tensor, w: Optional[Tensor], b: Optional[Tensor],
          z: Tensor, what: str, keep_graph: bool) -> Optional[LayerCall]:
    ws = z_offset(w, z, f"the {what} weight of MultiheadAttention")
    bs = z_offset(b, z, f"the {what} bias of MultiheadAttention")
    if ws is None and bs is None:
        return None
    return LayerCall(m, x if keep_graph else x.detach(), out, ws, bs, x._version,
                     (out.shape[-1], x.shape[-1]), "linear")


def _refuse(m: nn.MultiheadAttention, query: Tensor) -> None:
    if m.bias_k is not None or m.add_zero_attn:
        raise LayerGramNotApplicable("MultiheadAttention with add_bias_kv or add_zero_attn")
    if m.training and m.dropout > 0:
        raise LayerGramNotApplicable("MultiheadAttention with dropout in training mode: rows "
                                     "are random")
    if query.dim() != 3:
        raise LayerGramNotApplicable("MultiheadAttention on unbatched inputs: no data dimension")


def attention_calls(m: nn.MultiheadAttention, args: Sequence, kwargs: dict, output: Any,
                    z: Tensor, keep_graph: bool) -> Optional[Tuple[List[LayerCall], Any]]:
    """The recorded projections of ``m(*args, **kwargs) = output`` and the recomputed output
    to hand the network, or ``None`` when none of ``m``'s parameters is in z (module
    docstring)."""
    if all(z_offset(p, z, "a parameter of MultiheadAttention") is None
           for p in _parameters(m)):
        return None
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError as e:  # a subclass with another signature
        raise LayerGramNotApplicable(f"{type(m).__name__} called as ({e})") from e
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    _refuse(m, query)
    same = query is key and key is value
    q_in, k_in, v_in = (t if m.batch_first else t.transpose(0, 1) for t in (query, key, value))
    B, T, E = q_in.shape
    H, calls, qkv = m.num_heads, [], []
    for x, w, b, what in _projections(m, q_in, k_in, v_in, same):
        out = F.linear(x, w, b)
        qkv += list(out.chunk(3, -1)) if what == "in_proj" else [out]
        call = _call(m, x, out, w, b, z, what, keep_graph)
        calls += [] if call is None else [call]
    q, k, v = (t.reshape(B, t.shape[1], H, E // H).transpose(1, 2) for t in qkv)
    scores = (q * math.sqrt(1.0 / (E // H))) @ k.transpose(-2, -1)  # (B, H, T, S)
    mask = _mask(a["attn_mask"], a["key_padding_mask"], B, H, scores)
    attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(B, T, E)
    out = F.linear(o, m.out_proj.weight, m.out_proj.bias)
    call = _call(m, o, out, m.out_proj.weight, m.out_proj.bias, z, "out_proj", keep_graph)
    calls += [] if call is None else [call]
    result = out.clone() if m.batch_first else out.transpose(0, 1).clone()
    _check_same(result, output[0])
    weights = None
    if a["need_weights"]:
        weights = attn.mean(1) if a["average_attn_weights"] else attn
    return calls, (result, weights)


def _check_same(mine: Tensor, theirs: Tensor) -> None:
    tol = default_check_tol(theirs.dtype)
    scale = float(theirs.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if theirs.numel() else 0
    if mine.shape != theirs.shape or not torch.allclose(
            mine.detach(), theirs.detach(), rtol=tol, atol=tol * max(scale, 1.0),
            equal_nan=True):
        raise LayerGramNotApplicable(
            "MultiheadAttention: the attention recomputed from its inputs differs from the "
            "module's output (an option the layer-Gram rule does not reproduce)")
