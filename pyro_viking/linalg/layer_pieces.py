"""The pieces of :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`: recording a network's
layer calls (``nn.Linear``, ``nn.Conv{1,2,3}d``, norms' affine maps, ``nn.Embedding``,
``nn.MultiheadAttention``: inputs ``A_l``, outputs, columns of z; the rules are in
:mod:`~pyro_viking.linalg.layer_rules` and :mod:`~pyro_viking.linalg.layer_rules_attention`),
the output gradients ``G_l``, the per-layer factors (a "ghost" ``(A_l, G_l)`` for a Linear layer
on ``(B, in)`` inputs, an explicit ``(B, n)`` block otherwise), and the products built from
them: ``V Jᵀ`` (:func:`factored_mv`) and the cotangents of ``Σ_k U_k J V_kᵀ`` w.r.t. the pieces
(:func:`piece_cotangents`). See :mod:`pyro_viking.linalg.layer_gram` for the math.

Several rows per datum (``m`` outputs of datum ``i`` as rows ``i·m .. i·m + m − 1``,
datum-major): row ``(i, c)`` has the per-layer gradient ``g_{l,ic} a_{l,i}ᵀ``, so ``G_l`` gets one
row per row of ``fn`` (one backward per output ``c``, batched: :func:`output_grads`) and the
layer inputs are repeated ``m`` times (:func:`factor_layers`); everything downstream is the
one-row case with ``B·m`` rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from pyro_viking.linalg.layer_calls import (
    Block,
    Cols,
    Ghost,
    LayerCall,
    LayerGramNotApplicable,
    default_check_tol,
)
from pyro_viking.linalg.layer_rules import layer_blocks, record_call
from pyro_viking.linalg.layer_rules_attention import attention_calls
from pyro_viking.linalg.per_example import evaluate_rows

__all__ = [
    "Block", "Ghost", "LayerGramNotApplicable", "RowFn", "check_overlaps", "datum_rows",
    "default_check_tol", "detached", "factor_layers", "factored_mv", "ghost_gram", "ghost_rmv",
    "output_grads", "piece_cotangents", "pieces_gram", "record_forward", "validate_calls",
]

RowFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- recording
def _batch_stats(module: nn.Module) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    return isinstance(module, bn) and (module.training or not module.track_running_stats)


class _Recorder:
    """Global forward hook (with keyword arguments) recording every call of a module with a
    rule (:mod:`~pyro_viking.linalg.layer_rules`, :mod:`~pyro_viking.linalg.layer_rules_attention`)
    whose weights live in z."""

    def __init__(self, z: Tensor, keep_graph: bool = False):
        self.z, self.calls, self.seen, self.keep_graph = z, [], set(), keep_graph

    def __call__(self, module: nn.Module, args, kwargs, output):
        if _batch_stats(module):
            raise LayerGramNotApplicable(
                f"{type(module).__name__} uses batch statistics: rows are not independent")
        if isinstance(module, nn.MultiheadAttention):
            got = attention_calls(module, args, kwargs, output, self.z, self.keep_graph)
            if got is None:
                return None
            self._first_call(module)
            self.calls += got[0]
            return got[1]
        call = record_call(module, args, output, self.z, self.keep_graph)
        if call is None:
            return None
        self._first_call(module)
        self.calls.append(call)
        # downstream in-place ops (ReLU(inplace=True)) must not overwrite the tensor whose
        # gradient we take: hand the network a copy
        return output.clone()

    def _first_call(self, module: nn.Module) -> None:
        if id(module) in self.seen:
            raise LayerGramNotApplicable(
                f"{type(module).__name__} is called more than once (weight sharing)")
        self.seen.add(id(module))


def record_forward(fn: RowFn, z: Tensor, keep_graph: bool = False
                    ) -> Tuple[Tensor, List[LayerCall]]:
    rec = _Recorder(z, keep_graph)
    handle = register_module_forward_hook(rec, with_kwargs=True)
    try:
        with torch.enable_grad():
            rows = evaluate_rows(fn, z)
    finally:
        handle.remove()
    return rows, rec.calls


def datum_rows(num_rows: int, calls: List[LayerCall], rows_per_datum: Optional[int]) -> int:
    """Rows per datum ``m``: ``rows_per_datum`` if given, else ``num_rows`` over the leading
    dimension of the recorded layers' inputs when it divides (1 otherwise, or without layers).
    :class:`LayerGramNotApplicable` when a given ``m`` does not divide ``num_rows``."""
    if rows_per_datum is not None:
        if rows_per_datum < 1 or num_rows % rows_per_datum:
            raise LayerGramNotApplicable(
                f"{num_rows} rows are not {rows_per_datum} rows per datum")
        return int(rows_per_datum)
    B = calls[0].x.shape[0] if calls and calls[0].x.dim() else 0
    return num_rows // B if B and num_rows % B == 0 else 1


def validate_calls(calls: List[LayerCall], B: int) -> None:
    for c in calls:
        name = type(c.module).__name__
        need = 2 + len(c.module.kernel_size) if c.rule == "conv" else None
        least = 1 if c.rule == "embedding" else 2
        if c.x.dim() < least or c.x.shape[0] != B or (need and c.x.dim() != need):
            raise LayerGramNotApplicable(
                f"{name} input has shape {tuple(c.x.shape)}; expected a leading data "
                f"dimension of size B={B} (one row per datum)")
        if c.x._version != c.x_version:
            raise LayerGramNotApplicable(f"the input of {name} was modified in place")


def output_grads(rows: Tensor, calls: List[LayerCall], retain: bool,
                  create_graph: bool = False, rows_per_datum: int = 1) -> List[Tensor]:
    """``G_l = ∂(Σ_i rows_i)/∂out_l`` for every recorded layer (zeros where unused); detached
    unless ``create_graph``. With ``m = rows_per_datum > 1``: ``G_l`` ``(B·m, *out)``, row
    ``i·m + c`` the gradient of output ``c`` (``Σ_i rows_{i·m+c}``) at datum ``i``, from one
    batched backward over the ``m`` cotangents."""
    m = rows_per_datum
    Gs: List[Optional[Tensor]] = [None] * len(calls)
    idx = [i for i, c in enumerate(calls) if c.out.requires_grad]
    if rows.requires_grad and idx:
        outs = [calls[i].out for i in idx]
        keep = retain or create_graph
        if m == 1:
            got = torch.autograd.grad(rows.sum(), outs, allow_unused=True, retain_graph=keep,
                                      create_graph=create_graph)
        else:
            got = _per_output_grads(rows, outs, m, keep, create_graph)
        for i, g in zip(idx, got):
            Gs[i] = g
    return [_zeros_rows(c.out, m) if g is None else g if create_graph else g.detach()
            for c, g in zip(calls, Gs)]


def _per_output_grads(rows: Tensor, outs: List[Tensor], m: int, keep: bool,
                      create_graph: bool) -> List[Optional[Tensor]]:
    """``[∂(Σ_i rows_{i·m+c})/∂out]_c`` interleaved datum-major: ``(B·m, *out.shape[1:])``."""
    cot = torch.eye(m, dtype=rows.dtype, device=rows.device).repeat(1, rows.shape[0] // m)
    try:  # one vmapped backward over the m output cotangents
        got = torch.autograd.grad(rows, outs, cot, allow_unused=True, retain_graph=keep,
                                  create_graph=create_graph, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: one backward per output
        per_c = [torch.autograd.grad(rows, outs, cot[c], allow_unused=True, retain_graph=True,
                                     create_graph=create_graph) for c in range(m)]
        got = [None if per_c[0][j] is None else torch.stack([g[j] for g in per_c])
               for j in range(len(outs))]
    return [None if g is None else g.transpose(0, 1).reshape(-1, *g.shape[2:])
            for g in got]


def _zeros_rows(out: Tensor, m: int) -> Tensor:
    return out.new_zeros((out.shape[0] * m, *out.shape[1:]))


def factor_layers(calls: List[LayerCall], Gs: List[Tensor], B: int, rows_per_datum: int = 1
            ) -> Tuple[List[Ghost], List[Block]]:
    """The pieces of every layer for ``B`` rows; with ``rows_per_datum = m > 1`` the layer
    inputs (``B / m`` data) are repeated ``m`` times to align with ``G_l``'s ``B`` rows."""
    ghosts, blocks = [], []
    for c, G in zip(calls, Gs):
        if rows_per_datum > 1:
            c = replace(c, x=c.x.repeat_interleave(rows_per_datum, 0))
        g, b = layer_blocks(c, G, B)
        ghosts += g
        blocks += b
    return ghosts, blocks


def detached(ghosts: List[Ghost], blocks: List[Block]
              ) -> Tuple[List[Ghost], List[Block]]:
    return ([Ghost(g.A.detach(), g.G.detach(), g.cols, g.bias_cols) for g in ghosts],
            [Block(b.cols, b.J.detach(), b.span) for b in blocks])


def _ghost_bias_rows(g: Ghost) -> Tensor:
    """The bias rows ``Σ_t g_t`` ``(B, out)``."""
    return g.G if g.G.dim() == 2 else g.G.sum(1)


def _ghost_mv(g: Ghost, V: Tensor) -> Tensor:
    """``V Jᵀ`` ``(K, B)`` of one ghost: ``Σ_t g_tᵀ V_W a_t (+ v_b·Σ_t g_t)``."""
    K, o, i = V.shape[0], g.G.shape[-1], g.A.shape[-1]
    VW = V[:, g.cols].reshape(K, o, i)
    if g.A.dim() == 3:  # (K, B, T, ·) intermediate over the positions
        if i <= o:
            out = (torch.matmul(g.G[None], VW[:, None]) * g.A).sum((-2, -1))
        else:
            out = (torch.matmul(g.A[None], VW.transpose(1, 2)[:, None]) * g.G).sum((-2, -1))
    elif i <= o:  # (K, B, in) intermediate
        out = (torch.matmul(g.G, VW) * g.A).sum(-1)
    else:  # (K, out, B) intermediate
        out = (torch.matmul(VW, g.A.T) * g.G.T).sum(-2)
    if g.bias_cols is not None:
        out = out + V[:, g.bias_cols] @ _ghost_bias_rows(g).T
    return out


def ghost_rmv(g: Ghost, U: Tensor, out: Tensor) -> None:
    """Write ``U J`` ``(K, ·)`` of one ghost into the columns of ``out``: ``Σ_{i,t} u_ki
    g_it a_itᵀ`` (weight) and ``Σ_i u_ki Σ_t g_it`` (bias)."""
    K, o, i = U.shape[0], g.G.shape[-1], g.A.shape[-1]
    G, A = g.G.reshape(-1, o), g.A.reshape(-1, i)  # (B·T, ·), datum-major
    Ur = U if g.G.dim() == 2 else U.repeat_interleave(g.G.shape[1], 1)
    UG = Ur[:, None, :] * G.T  # (K, out, B·T)
    for k in range(K):  # straight into the output rows (no (K, out·in) temporary)
        torch.matmul(UG[k], A, out=out[k, g.cols].view(o, i))
    if g.bias_cols is not None:
        out[:, g.bias_cols] = U @ _ghost_bias_rows(g)


def ghost_gram(g: Ghost, h: Optional[Ghost] = None) -> Tensor:
    """``J Jᵀ`` ``(B, B)`` of one ghost in float64: ``(G Gᵀ) ⊙ (A Aᵀ [+ 1])``, over the ``B·T``
    positions and summed over position pairs, ``Σ_{t,s} (g_it·g_js)(a_it·a_js [+ 1])``; with a
    second ghost ``h`` of the same layer (its Jacobian ``J_h``), the cross-Gram ``J J_hᵀ``:
    ``(G G_hᵀ) ⊙ (A A_hᵀ [+ 1])``."""
    B = g.G.shape[0]
    G = g.G.reshape(-1, g.G.shape[-1]).to(torch.float64)
    A = g.A.reshape(-1, g.A.shape[-1]).to(torch.float64)
    if h is None or h is g:
        Gh, Ah = G, A
    else:
        Gh = h.G.reshape(-1, h.G.shape[-1]).to(torch.float64)
        Ah = A if h.A is g.A else h.A.reshape(-1, h.A.shape[-1]).to(torch.float64)
    AA = A @ Ah.T
    if g.bias_cols is not None:
        AA += 1.0
    K = (G @ Gh.T) * AA
    return K if g.G.dim() == 2 else K.view(B, -1, B, K.shape[1] // B).sum((1, 3))


def pieces_gram(ghosts: List[Ghost], blocks: List[Block], B: int, device: torch.device,
                other: Optional[Tuple[List[Ghost], List[Block]]] = None) -> Tensor:
    """``J J_oᵀ`` ``(B, B)`` in float64 from the pieces of J and of ``J_o`` (``other``: pieces
    of the same layers, one for one; ``None``: J itself): :func:`ghost_gram` per ghost plus
    ``J_b J_{o,b}ᵀ`` per block."""
    o_ghosts, o_blocks = (ghosts, blocks) if other is None else other
    K = torch.zeros(B, B, dtype=torch.float64, device=device)
    for g, h in zip(ghosts, o_ghosts):
        K += ghost_gram(g, h)
    for b, c in zip(blocks, o_blocks):
        J = b.J.to(torch.float64)
        K += J @ (J if c is b else c.J.to(torch.float64)).T
    return K


def factored_mv(ghosts: List[Ghost], blocks: List[Block], V: Tensor, B: int) -> Tensor:
    """``V Jᵀ`` ``(K, B)`` from the factored pieces, one or two matmuls per layer."""
    out = V.new_zeros(V.shape[0], B)
    for g in ghosts:
        out = out + _ghost_mv(g, V)
    for b in blocks:
        out = out + _take(V, b.cols) @ b.J.T
    return out


def piece_cotangents(ghosts: List[Ghost], blocks: List[Block], U: Tensor, V: Tensor
                      ) -> Tuple[List[Tensor], List[Tensor]]:
    """The graph-connected pieces and the cotangents ``∂b/∂piece`` of
    ``b = Σ_k U_k J V_kᵀ = Σ_l Σ_{k,i,t} u_ki g_litᵀ (V_{k,l} a_lit [+ v_{k,l}]) + Σ_b ⟨Uᵀ V_b,
    J_b⟩`` (``t`` the positions of a ghost on sequences, none on ``(B, in)`` inputs).
    """
    K = U.shape[0]
    outs, cots = [], []
    for g in ghosts:
        if not (g.A.requires_grad or g.G.requires_grad):
            continue
        o, i = g.G.shape[-1], g.A.shape[-1]
        VW = V[:, g.cols].reshape(K, o, i)
        Ut = U.T if g.G.dim() == 2 else U.T[:, None]  # (B, [1,] K)
        if g.A.requires_grad:  # Σ_k u_ki V_kᵀ g_it: (…, K·out) @ (K·out, in)
            UG = (Ut[..., None] * g.G.unsqueeze(-2)).flatten(-2)
            outs.append(g.A)
            cots.append(UG @ VW.reshape(K * o, i))
        if g.G.requires_grad:  # Σ_k u_ki (V_k a_it + v_k): (…, in) @ (in, K·out)
            AV = (g.A.detach() @ VW.permute(2, 0, 1).reshape(i, K * o)).unflatten(-1, (K, o))
            cG = (Ut[..., None] * AV).sum(-2)
            if g.bias_cols is not None:
                cG = cG + (Ut @ V[:, g.bias_cols])
            outs.append(g.G)
            cots.append(cG)
    for b in blocks:
        if b.J.requires_grad:
            outs.append(b.J)
            cots.append(U.T @ _take(V, b.cols))
    return outs, cots


def check_overlaps(pieces: List[Tuple[int, int]]) -> None:
    pieces = sorted(pieces)
    for (_, a1), (b0, _) in zip(pieces, pieces[1:]):
        if b0 < a1:
            raise LayerGramNotApplicable(
                f"columns [{b0}, {a1}) of z are used by two layers (weight sharing)")


def _take(V: Tensor, cols: Cols) -> Tensor:
    return V[:, cols] if isinstance(cols, slice) else V.index_select(1, cols)
