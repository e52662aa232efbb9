"""The pieces of :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`: recording a network's
``nn.Linear`` / ``nn.Conv{1,2,3}d`` / eval-mode batch norm calls (inputs ``A_l``, outputs,
columns of z), the output gradients ``G_l``, the per-layer factors (a "ghost" ``(A_l, G_l)`` for a
Linear layer on ``(B, in)`` inputs, an explicit ``(B, n)`` block otherwise), and the products
built from them: ``V Jᵀ`` (:func:`factored_mv`) and the cotangents of ``Σ_k U_k J V_kᵀ`` w.r.t.
the pieces (:func:`piece_cotangents`). See :mod:`pyro_viking.linalg.layer_gram` for the math.

Several rows per datum (``m`` outputs of datum ``i`` as rows ``i·m .. i·m + m − 1``,
datum-major): row ``(i, c)`` has the per-layer gradient ``g_{l,ic} a_{l,i}ᵀ``, so ``G_l`` gets one
row per row of ``fn`` (one backward per output ``c``, batched: :func:`output_grads`) and the
layer inputs are repeated ``m`` times (:func:`factor_layers`); everything downstream is the
one-row case with ``B·m`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from pyro_viking.linalg.per_example import evaluate_rows

__all__ = [
    "Block", "Ghost", "LayerGramNotApplicable", "RowFn", "check_overlaps", "datum_rows",
    "default_check_tol", "detached", "factor_layers", "factored_mv", "output_grads",
    "piece_cotangents", "record_forward", "validate_calls",
]

RowFn = Callable[[Tensor], Tensor]
Cols = Union[slice, Tensor]

#: convolutions whose per-example weight gradients are one grouped weight-gradient convolution
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: batch norms, recorded in eval mode only: per channel c the affine map γ_c x̂_c + β_c of the
#: input normalised by the running statistics, x̂ = (a − μ) / √(σ² + ε)
NORMS = (nn.modules.batchnorm._BatchNorm,)


class LayerGramNotApplicable(NotImplementedError):
    """The model is outside what :class:`LayerGramJacobian` computes exactly."""


@dataclass
class _Call:
    """One recorded layer call: detached input, graph-connected output, columns in z."""

    module: nn.Module
    x: Tensor
    out: Tensor
    w_start: Optional[int]
    b_start: Optional[int]
    x_version: int
    w_shape: Tuple[int, ...]


@dataclass
class Ghost:
    """Weight of a Linear layer on (B, in) inputs: per-example gradient ``g_i a_iᵀ``, and its
    bias (per-example gradient ``g_i``) when ``bias_cols`` is set, so that the layer's Gram is
    the one Hadamard product ``(G Gᵀ) ⊙ (A Aᵀ + 1)``."""

    A: Tensor  # (B, in)
    G: Tensor  # (B, out)
    cols: slice  # out*in columns, row-major (out, in)
    bias_cols: Optional[slice] = None  # out columns


@dataclass
class Block:
    """An explicit ``(B, n)`` Jacobian block on columns ``cols`` of z."""

    cols: Cols
    J: Tensor


# --------------------------------------------------------------------------- recording
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


def _z_offset(t: Optional[Tensor], z: Tensor, what: str) -> Optional[int]:
    """First column of z occupied by ``t`` (a contiguous row-major view of z), or ``None``
    when ``t`` does not depend on z (a constant)."""
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


def _batch_stats(module: nn.Module) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    return isinstance(module, bn) and (module.training or not module.track_running_stats)


class _Recorder:
    """Global forward hook recording every Linear / Conv{1,2,3}d / eval-mode batch norm call
    whose weights live in z (inputs detached, unless ``keep_graph``; a batch norm's normalised)."""

    def __init__(self, z: Tensor, keep_graph: bool = False):
        self.z, self.calls, self.seen, self.keep_graph = z, [], set(), keep_graph

    def __call__(self, module: nn.Module, inputs, output):
        if _batch_stats(module):
            raise LayerGramNotApplicable(
                f"{type(module).__name__} uses batch statistics: rows are not independent")
        if not isinstance(module, (nn.Linear, *CONVS, *NORMS)):
            return None
        name = type(module).__name__
        w = _z_offset(module.weight, self.z, f"the weight of {name}")
        b = _z_offset(module.bias, self.z, f"the bias of {name}")
        if w is None and b is None:
            return None
        if id(module) in self.seen:
            raise LayerGramNotApplicable(f"{name} is called more than once (weight sharing)")
        self.seen.add(id(module))
        if isinstance(module, CONVS) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise LayerGramNotApplicable(f"{name} needs groups=1 and padding_mode='zeros'")
        x = inputs[0] if inputs else None
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            raise LayerGramNotApplicable(f"{name} called without a tensor input/output")
        if isinstance(module, NORMS):  # record x̂, the input of the affine map (NORMS)
            x = F.batch_norm(x, module.running_mean, module.running_var, eps=module.eps)
        self.calls.append(_Call(module, x if self.keep_graph else x.detach(), output, w, b,
                                x._version, tuple(module.weight.shape)))
        # downstream in-place ops (ReLU(inplace=True)) must not overwrite the tensor whose
        # gradient we take: hand the network a copy
        return output.clone()


def record_forward(fn: RowFn, z: Tensor, keep_graph: bool = False
                    ) -> Tuple[Tensor, List[_Call]]:
    rec = _Recorder(z, keep_graph)
    handle = register_module_forward_hook(rec)
    try:
        with torch.enable_grad():
            rows = evaluate_rows(fn, z)
    finally:
        handle.remove()
    return rows, rec.calls


def datum_rows(num_rows: int, calls: List[_Call], rows_per_datum: Optional[int]) -> int:
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


def validate_calls(calls: List[_Call], B: int) -> None:
    for c in calls:
        name = type(c.module).__name__
        need = 2 + len(c.module.kernel_size) if isinstance(c.module, CONVS) else None
        if c.x.dim() < 2 or c.x.shape[0] != B or (need and c.x.dim() != need):
            raise LayerGramNotApplicable(
                f"{name} input has shape {tuple(c.x.shape)}; expected a leading data "
                f"dimension of size B={B} (one row per datum)")
        if c.x._version != c.x_version:
            raise LayerGramNotApplicable(f"the input of {name} was modified in place")


def output_grads(rows: Tensor, calls: List[_Call], retain: bool,
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


def _layer_blocks(c: _Call, G: Tensor, B: int) -> Tuple[List[Ghost], List[Block]]:
    """Jacobian pieces of one layer: a ghost (Linear on 2-D input) or materialised blocks."""
    out, nw = c.w_shape[0], math.prod(c.w_shape)
    wcols = None if c.w_start is None else slice(c.w_start, c.w_start + nw)
    bcols = None if c.b_start is None else slice(c.b_start, c.b_start + out)
    ghosts, blocks = [], []
    if isinstance(c.module, NORMS):  # per example: ∂/∂γ_c = Σ_s g_cs x̂_cs, ∂/∂β_c = Σ_s g_cs
        spatial = tuple(range(2, G.dim()))  # (sum over an empty tuple would sum every dim)
        W, Gb = ((G * c.x).sum(spatial), G.sum(spatial)) if spatial else (G * c.x, G)
        if wcols is not None:
            blocks.append(Block(wcols, W))
    elif isinstance(c.module, nn.Linear) and c.x.dim() == 2:
        if wcols is not None:
            ghosts.append(Ghost(c.x, G, wcols, bcols))
            return ghosts, blocks
        Gb = G
    else:
        if isinstance(c.module, CONVS):
            nd = len(c.module.kernel_size)
            if G.dim() != 2 + nd:
                raise LayerGramNotApplicable(f"{type(c.module).__name__} output is not "
                                             f"(B, C_out, {nd} spatial dims)")
            W = _conv_weight_grads(c.module, c.x, G)  # (B, C_out, C·∏k)
            Gb = G.sum(tuple(range(2, 2 + nd)))
        else:  # Linear on (B, ..., in): sum over the extra positions
            A, Gr = c.x.reshape(B, -1, c.x.shape[-1]), G.reshape(B, -1, out)
            W = torch.bmm(Gr.transpose(1, 2), A)  # (B, out, in)
            Gb = Gr.sum(1)
        if wcols is not None:
            blocks.append(Block(wcols, W.reshape(B, nw)))
    if bcols is not None:
        blocks.append(Block(bcols, Gb))
    return ghosts, blocks


def factor_layers(calls: List[_Call], Gs: List[Tensor], B: int, rows_per_datum: int = 1
            ) -> Tuple[List[Ghost], List[Block]]:
    """The pieces of every layer for ``B`` rows; with ``rows_per_datum = m > 1`` the layer
    inputs (``B / m`` data) are repeated ``m`` times to align with ``G_l``'s ``B`` rows."""
    ghosts, blocks = [], []
    for c, G in zip(calls, Gs):
        if rows_per_datum > 1:
            c = replace(c, x=c.x.repeat_interleave(rows_per_datum, 0))
        g, b = _layer_blocks(c, G, B)
        ghosts += g
        blocks += b
    return ghosts, blocks


def detached(ghosts: List[Ghost], blocks: List[Block]
              ) -> Tuple[List[Ghost], List[Block]]:
    return ([Ghost(g.A.detach(), g.G.detach(), g.cols, g.bias_cols) for g in ghosts],
            [Block(b.cols, b.J.detach()) for b in blocks])


def factored_mv(ghosts: List[Ghost], blocks: List[Block], V: Tensor, B: int) -> Tensor:
    """``V Jᵀ`` ``(K, B)`` from the factored pieces, one or two matmuls per layer."""
    K = V.shape[0]
    out = V.new_zeros(K, B)
    for g in ghosts:
        o, i = g.G.shape[1], g.A.shape[1]
        VW = V[:, g.cols].reshape(K, o, i)
        if i <= o:  # (K, B, in) intermediate
            out = out + (torch.matmul(g.G, VW) * g.A).sum(-1)
        else:  # (K, out, B) intermediate
            out = out + (torch.matmul(VW, g.A.T) * g.G.T).sum(-2)
        if g.bias_cols is not None:
            out = out + V[:, g.bias_cols] @ g.G.T
    for b in blocks:
        out = out + _take(V, b.cols) @ b.J.T
    return out


def piece_cotangents(ghosts: List[Ghost], blocks: List[Block], U: Tensor, V: Tensor
                      ) -> Tuple[List[Tensor], List[Tensor]]:
    """The graph-connected pieces and the cotangents ``∂b/∂piece`` of
    ``b = Σ_k U_k J V_kᵀ = Σ_l Σ_{k,i} u_ki g_liᵀ (V_{k,l} a_li [+ v_{k,l}]) + Σ_b ⟨Uᵀ V_b, J_b⟩``.
    """
    K = U.shape[0]
    outs, cots = [], []
    for g in ghosts:
        o, i = g.G.shape[1], g.A.shape[1]
        VW = V[:, g.cols].reshape(K, o, i)
        if not (g.A.requires_grad or g.G.requires_grad):
            continue
        if g.A.requires_grad:  # Σ_k diag(u_k) G V_k: (B, K·out) @ (K·out, in)
            UG = (U.T[:, :, None] * g.G[:, None, :]).reshape(-1, K * o)
            outs.append(g.A)
            cots.append(UG @ VW.reshape(K * o, i))
        if g.G.requires_grad:  # Σ_k diag(u_k) (A V_kᵀ + v_k): (B, in) @ (in, K·out)
            AV = (g.A.detach() @ VW.permute(2, 0, 1).reshape(i, K * o)).reshape(-1, K, o)
            cG = (U.T[:, :, None] * AV).sum(1)
            if g.bias_cols is not None:
                cG = cG + U.T @ V[:, g.bias_cols]
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


def default_check_tol(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps)
