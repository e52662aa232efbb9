"""Exact loss Jacobians of layered networks from one forward and one backward pass.

The "ghost norm" identity of DP-SGD, used as a full matrix.  Let ``fn: z (D,) -> rows (B,)``
slice ``z`` into the weights of a network (the weight tensors are *views of z*) and evaluate
it on B inputs, each row depending only on its own datum.  For a ``nn.Linear`` layer with
inputs ``A ∈ R^{B×in}`` and output gradients ``G = ∂(Σ_i rows_i)/∂out ∈ R^{B×out}``, row i of
the Jacobian restricted to the layer is ``vec(g_i a_iᵀ)`` (weight) and ``g_i`` (bias), so

    J Jᵀ  = Σ_l (G_l G_lᵀ) ⊙ (A_l A_lᵀ + 1[bias])  +  J_rest J_restᵀ,
    V Jᵀ  = Σ_l einsum('bo,koi,bi->kb', G_l, V_W, A_l) + V_b G_lᵀ  +  V_rest J_restᵀ,
    U J   = [einsum('kb,bo,bi->koi', U, G_l, A_l), U G_l]_l  ⊕  U J_rest.

Only ``A_l``, ``G_l`` (B × width) and the B × B Gram are kept, never a ``(B, D)`` matrix.

``nn.Linear`` applied to ``(B, T, in)`` inputs (T positions) keeps the ghost form over the
``B·T`` positions, ``(J Jᵀ)_{ij} = Σ_{t,s} (g_{it}·g_{js})(a_{it}·a_{js} [+ 1])``, when
``(B·T)² ≤ B·out·in``. ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (any stride / padding /
dilation, ``groups=1``) and the other sequence linears are handled by *materialising* their
per-example weight gradients, ``W_i = G_i U_iᵀ`` with ``U = unfold(A) ∈ R^{B×(C·∏k)×L}`` and
``G_i ∈ R^{C_out×L}``: an exact ``(B, C_out·C·∏k)`` block, small for LeNet-sized nets, whose
Gram costs ``B²·|W|`` (the Hadamard form ``Σ (U_iᵀU_j) ⊙ (G_i G_jᵀ)`` would need ``B²L²``
memory). For convolutions the block is one weight-gradient convolution with the batch folded
into the groups (no unfold).

Several rows per datum (``rows_per_datum``; e.g. the ``C`` outputs of a classifier, rows
datum-major): row ``(i, c)`` of a Linear layer is ``vec(g_{ic} a_iᵀ)``, so the same identities
hold with ``G`` ``(B·C, out)`` from one batched backward over the ``C`` output cotangents and
``A`` repeated ``C`` times; the Gram is ``(B·C) × (B·C)``.

A batch norm in eval mode is the affine map ``γ_c x̂_c + β_c`` per channel ``c`` of its input
normalised by the running statistics, ``x̂ = (a − μ)/√(σ² + ε)``: its rows are the exact
``(B, C)`` blocks ``Σ_s G_{ics} x̂_{ics}`` (``γ``) and ``Σ_s G_{ics}`` (``β``), ``s`` the positions.
In training mode (batch statistics) it is refused.

Norms' elementwise affine maps (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``),
``nn.Embedding`` lookups and the projections of ``nn.MultiheadAttention`` have rules of their
own (:mod:`pyro_viking.linalg.layer_rules`, :mod:`pyro_viking.linalg.layer_rules_attention`).

Columns of ``z`` used by no recorded layer (a noise scale, a class token, …) form
``J_rest``, computed densely by forward mode (one ``jvp`` per column, vmapped); more than
``max_rest_columns`` of them, or an operator without forward mode on their path, is an error.

The recording and the per-layer pieces live in :mod:`pyro_viking.linalg.layer_pieces`.

Everything unsupported raises :class:`LayerGramNotApplicable` (a ``NotImplementedError``), so a
caller can fall back to :class:`~pyro_viking.linalg.per_example.PerExampleJacobian` or CG;
:func:`select_jacobian_backend` does exactly that.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyro_viking.linalg.layer_calls import col_range
from pyro_viking.linalg.layer_pieces import (
    Block,
    Ghost,
    LayerGramNotApplicable,
    RowFn,
    check_overlaps,
    datum_rows,
    default_check_tol,
    detached,
    factor_layers,
    factored_mv,
    ghost_rmv,
    output_grads,
    piece_cotangents,
    pieces_gram,
    record_forward,
    validate_calls,
)
from pyro_viking.linalg.operators import JacobianOperator
from pyro_viking.linalg.per_example import (
    PerExampleJacobian,
    autograd_bilinear,
    evaluate_rows,
    forward_jacobian_columns,
)

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "DEFAULT_MAX_REST_COLUMNS",
    "LayerGramJacobian",
    "LayerGramNotApplicable",
    "select_jacobian_backend",
]

#: Columns of z outside every layer above which :class:`LayerGramJacobian` refuses (each
#: costs one forward-mode pass and B numbers).
DEFAULT_MAX_REST_COLUMNS = 64
#: Largest ``B·D·itemsize`` for which :func:`select_jacobian_backend` builds a dense Jacobian.
DEFAULT_MAX_DENSE_BYTES = 128 * 2**20


# --------------------------------------------------------------------------- the operator
class LayerGramJacobian(JacobianOperator):
    """Exact loss Jacobian of a layered network in factored (per-layer) form.

    :param fn: ``z (D,) -> rows (B,)``; it must evaluate its layers (``nn.Linear``,
        ``nn.Conv{1,2,3}d``, norms, ``nn.Embedding``, ``nn.MultiheadAttention``: module
        docstring) as modules (through their ``forward``, e.g. ``functional_call``) with weights
        that are contiguous views ``z[a:b].view(shape)``; rows must be independent across
        data (no BatchNorm in train mode).
    :param z: the point ``(D,)``; ``params = (z,)``.
    :param check: compare ``rmv(u)`` with an autograd vector-Jacobian product of ``fn`` for
        one random ``u`` (one extra backward pass on the retained graph) and raise
        :class:`LayerGramNotApplicable` when the relative error exceeds ``check_tol``; this
        catches weights used outside the recorded layers and rows that are not independent.
        It costs about one more forward+backward; a caller rebuilding the operator on every
        batch of the same model may check the first build only.
    :param check_tol: default ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4 in float32).
    :param max_rest_columns: most columns of z outside every layer (computed by jvp).
    :param rows_per_datum: ``m`` rows per datum, datum-major (row ``i·m + c``: output ``c`` of
        datum ``i``); ``None`` infers ``m`` = rows / the layers' batch. Default 1: the rows
        must match the layers' batch.
    :param keep_graph: build from ``z`` itself with a ``create_graph`` backward and keep that
        graph, so that :meth:`bilinear` (the implicit gradient of a projection) differentiates
        this build's forward/backward instead of running the network again; default: when
        ``z`` requires grad and grad mode is on. Memory: the graph lives as long as the operator.

    Raises :class:`LayerGramNotApplicable` (a ``NotImplementedError``) for weight sharing,
    non-view / non-contiguous weights, inputs without a leading B dimension, batch statistics,
    grouped convolutions and too many rest columns.  Attributes: ``backend_name``,
    ``num_layers``, ``rest_columns`` (LongTensor), ``check_error``.
    """

    has_cheap_gram = True
    backend_name = "layer_gram"

    def __init__(self, fn: RowFn, z: Tensor, *, check: bool = True,
                 check_tol: Optional[float] = None,
                 max_rest_columns: int = DEFAULT_MAX_REST_COLUMNS,
                 keep_graph: Optional[bool] = None, rows_per_datum: Optional[int] = 1):
        if keep_graph is None:
            keep_graph = torch.is_grad_enabled() and z.requires_grad
        self._rows_per_datum = rows_per_datum
        # Building needs autograd whatever the caller's mode (e.g. prediction under no_grad).
        with torch.enable_grad():
            self._build(fn, z, check, check_tol, max_rest_columns, keep_graph)

    def _build(self, fn: RowFn, z: Tensor, check: bool, check_tol: Optional[float],
               max_rest_columns: int, keep_graph: bool) -> None:
        # keep_graph: record from z itself and differentiate the backward (create_graph), so that
        # bilinear() reuses this forward/backward (costs about nothing more here).
        keep_graph = keep_graph and z.dim() == 1 and z.stride(0) == 1 and z.requires_grad
        x = z if keep_graph else z.detach()
        if not keep_graph:
            x = (x if x.dim() != 1 or x.stride(0) == 1 else x.contiguous()).requires_grad_()
        rows, calls = record_forward(fn, x, keep_graph=keep_graph)
        B, D = rows.shape[0], x.shape[0]
        super().__init__((B, D), z.dtype, z.device)
        self.fn, self.z = fn, z
        #: rows per datum ``m`` (datum-major rows)
        self.rows_per_datum = m = datum_rows(B, calls, self._rows_per_datum)
        validate_calls(calls, B // m)
        Gs = output_grads(rows, calls, retain=check or keep_graph, create_graph=keep_graph,
                          rows_per_datum=m)
        pieces = factor_layers(calls, Gs, B, m)
        #: the factored pieces as differentiable functions of z (``keep_graph``), else None
        self._graph_pieces = pieces if keep_graph else None
        self._ghosts, self._blocks = detached(*pieces)
        self.num_layers = len(calls)
        self._add_rest(x, max_rest_columns)
        self._gram: Optional[Tensor] = None
        self.check_error: Optional[float] = None
        if check:
            self._check(rows, x, default_check_tol(z.dtype) if check_tol is None else check_tol)

    def _add_rest(self, x: Tensor, max_rest: int) -> None:
        ranges = [col_range(p) for p in self._ghosts + self._blocks]
        ranges += [(g.bias_cols.start, g.bias_cols.stop) for g in self._ghosts
                   if g.bias_cols is not None]
        check_overlaps(ranges)
        # the columns outside every range (no D-sized mask: D may be large)
        gaps, end = [], 0
        for a, b in sorted(ranges) + [(self.shape[1], self.shape[1])]:
            if a > end:
                gaps.append(torch.arange(end, a, device=x.device))
            end = max(end, b)
        idx = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.long, device=x.device)
        self.rest_columns = idx
        if idx.numel() > max_rest:
            raise LayerGramNotApplicable(
                f"{idx.numel()} of the {self.shape[1]} columns of z are used outside the "
                f"recorded layers (limit max_rest_columns={max_rest}); use "
                "PerExampleJacobian or the matrix-free (CG) projection for this model")
        if idx.numel():
            try:
                J_rest = forward_jacobian_columns(self.fn, x.detach(), idx, self.shape[0])
            except NotImplementedError as e:  # an operator without forward mode (CPU attention)
                raise LayerGramNotApplicable(f"the rest columns need forward mode: {e}") from e
            self._blocks.append(Block(idx, J_rest))

    def _check(self, rows: Tensor, x: Tensor, tol: float) -> None:
        # Random signs, not Gaussian weights: backpropagating ±1 instead of 1 from a row negates
        # every intermediate exactly, so autograd and the factored form round identically row
        # by row and agree to the final reductions, even where the per-row gradients are
        # themselves inaccurate (float32 log-softmax of saturated, memorised data).
        gen = torch.Generator(device=x.device).manual_seed(0)
        u = torch.randint(0, 2, (self.shape[0],), generator=gen, device=x.device)
        u = (2 * u - 1).to(x.dtype)
        ref = None
        if rows.requires_grad:
            (ref,) = torch.autograd.grad(rows, x, u, allow_unused=True,
                                         retain_graph=self._graph_pieces is not None)
        ref = torch.zeros_like(x) if ref is None else ref.detach()
        got = self.rmv(u[None])[0]
        err = float((got - ref).norm() / ref.norm().clamp_min(torch.finfo(x.dtype).tiny))
        self.check_error = err
        if not err <= tol:
            raise LayerGramNotApplicable(
                f"layer-Gram Jacobian does not match autograd (rel. err {err:.2e} > {tol:.1e}): "
                "the model uses its weights outside nn.Linear/nn.ConvNd, or its rows are not "
                "independent across data; use PerExampleJacobian or the CG projection")

    @property
    def params(self) -> Tuple[Tensor, ...]:
        return (self.z,)

    def mv(self, V: Tensor) -> Tensor:
        """``V Jᵀ``: ``(K, D) -> (K, B)``, one or two matmuls per layer."""
        return factored_mv(self._ghosts, self._blocks, V, self.shape[0])

    def rmv(self, U: Tensor) -> Tensor:
        """``U J``: ``(K, B) -> (K, D)``, written layer by layer into the columns of z."""
        K = U.shape[0]
        out = U.new_empty(K, self.shape[1])  # every column belongs to a ghost or a block
        for g in self._ghosts:
            ghost_rmv(g, U, out)
        for b in self._blocks:
            if b.span is not None:  # the layer's columns outside b.cols are zero columns
                out[:, b.span] = 0
            out[:, b.cols] = U @ b.J
        return out

    def gram(self) -> Tensor:
        """``J Jᵀ = Σ_l (G_l G_lᵀ) ⊙ (A_l A_lᵀ [+ 1]) + Σ_blocks J_b J_bᵀ`` in float64
        ``(B, B)`` (``+ 1``: the layer's bias)."""
        if self._gram is None:
            self._gram = pieces_gram(self._ghosts, self._blocks, self.shape[0], self.device)
        return self._gram

    @property
    def pieces(self) -> Tuple[List[Ghost], List[Block]]:
        """The factored Jacobian (detached): the ghosts ``(A_l, G_l)`` of the Linear layers and
        the explicit blocks, each on its columns of z (:mod:`~pyro_viking.linalg.cross_gram`)."""
        return self._ghosts, self._blocks

    def release_graph(self) -> None:
        self._graph_pieces = None

    def bilinear_grad(self, U: Tensor, V: Tensor) -> Tuple[Optional[Tensor], ...]:
        """``∇_z Σ_k U_k J(z) V_kᵀ`` (U, V constant).

        From the build's graph (``keep_graph``): the cotangents of the pieces in closed form,
        ``∂/∂A_l = Σ_k diag(u_k) G_l V_{k,l}``, ``∂/∂G_l = Σ_k diag(u_k) (A_l V_{k,l}ᵀ + v_{k,b})``,
        ``∂/∂J_b = Uᵀ V_b`` (two matmuls per layer, no forward of the bilinear form), then one
        backward through the build's backward and forward. Otherwise autograd through
        :meth:`bilinear`."""
        if self._graph_pieces is None or self.rest_columns.numel() or not self.z.requires_grad:
            return super().bilinear_grad(U, V)
        outs, cots = piece_cotangents(*self._graph_pieces, U, V)
        if not outs:
            return (None,)
        with torch.enable_grad():
            return torch.autograd.grad(outs, (self.z,), cots, allow_unused=True,
                                       retain_graph=True)

    def bilinear(self, U: Tensor, V: Tensor) -> Tensor:
        """``Σ_k U_k J V_kᵀ``, differentiable w.r.t. ``z``.

        The factored form with the layer inputs ``A_l(z)`` and output gradients ``G_l(z)``
        kept differentiable: one more forward and ``create_graph`` backward of ``fn`` whatever
        K, where :func:`~pyro_viking.linalg.per_example.autograd_bilinear` needs K of them.
        Columns outside the layers (``rest_columns``) use ``autograd_bilinear``. (The
        projection's implicit gradient calls :meth:`bilinear_grad`, which reuses the build's
        graph instead.)
        """
        if not self.z.requires_grad:
            return (U * self.mv(V)).sum()
        if self.rest_columns.numel() == 0:
            try:
                with torch.enable_grad():
                    rows, calls = record_forward(self.fn, self.z, keep_graph=True)
                    if len(calls) == self.num_layers and rows.shape[0] == self.shape[0]:
                        B, m = self.shape[0], self.rows_per_datum
                        validate_calls(calls, B // m)
                        Gs = output_grads(rows, calls, retain=True, create_graph=True,
                                          rows_per_datum=m)
                        ghosts, blocks = factor_layers(calls, Gs, B, m)
                        return (U * factored_mv(ghosts, blocks, V, self.shape[0])).sum()
            except LayerGramNotApplicable:
                pass  # e.g. a non-contiguous z: the generic route below
        return autograd_bilinear(self.fn, self.z, U, V)


# --------------------------------------------------------------------------- selection
def select_jacobian_backend(
    fn: RowFn,
    z: Tensor,
    *,
    batch_size: Optional[int] = None,
    prefer: Optional[str] = None,
    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    check: bool = True,
    rows_per_datum: Optional[int] = 1,
) -> Optional[JacobianOperator]:
    """Pick an exact Jacobian operator for ``fn`` at ``z``, or ``None`` for matrix-free CG.

    Rule (``prefer=None``):

    1. :class:`LayerGramJacobian` — when it applies, i.e. does not raise
       :class:`LayerGramNotApplicable`; it costs about one forward and two backward passes
       and memory ``O(B·width)`` regardless of D;
    2. else :class:`PerExampleJacobian` when ``B · D · itemsize ≤ max_dense_bytes``;
    3. else ``None``: the caller uses the matrix-free (CG) projection.

    Both exact routes are built once per batch and then serve any number of vectors, and CG is
    slower per vector and inexact at a fixed iteration count (design §3), so the order does
    not depend on how many vectors are projected.

    :param batch_size: B, the number of rows of ``fn`` (evaluated from ``fn`` when needed).
    :param prefer: ``"layer_gram"`` or ``"per_example"`` forces that backend (its errors
        propagate); ``None`` applies the rule.
    :param check, rows_per_datum: passed to :class:`LayerGramJacobian` (verify it against
        autograd; rows per datum, ``None`` to infer it).
    """
    if prefer not in (None, "layer_gram", "per_example"):
        raise ValueError(f"prefer must be None, 'layer_gram' or 'per_example', got {prefer!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if prefer == "layer_gram":
        return LayerGramJacobian(fn, z, check=check, rows_per_datum=rows_per_datum)
    if prefer == "per_example":
        return PerExampleJacobian(fn, z)
    try:
        return LayerGramJacobian(fn, z, check=check, rows_per_datum=rows_per_datum)
    except LayerGramNotApplicable:
        pass
    if batch_size is None:
        with torch.no_grad():
            batch_size = int(evaluate_rows(fn, z.detach()).shape[0])
    if batch_size * z.numel() * z.element_size() <= max_dense_bytes:
        return PerExampleJacobian(fn, z)
    return None
