"""Dense per-example Jacobians of a row function ``fn: z (D,) -> rows (B,)``.

``J[i] = ∇_z rows_i(z)`` is built once, either with vectorised per-sample gradients
(``torch.func.vmap`` over ``torch.func.vjp`` with the B unit cotangents) or with B reverse
passes written into a preallocated ``(B, D)`` tensor (allocating once avoids the page-fault
cost of growing a large matrix, design §3). The vmapped pass is B reverse passes *batched*:
every data-parallel layer then works on B × B rows, and every slice ``z[a:b]`` taken by the
model materialises a ``(B, D)`` gradient buffer; it wins for small ``B·D`` only (see
:data:`DEFAULT_VMAP_MAX_ELEMENTS`). The loop is also the fallback when the model cannot be
vmapped (data-dependent control flow, random ops, unsupported operators).

Memory is ``B·D`` numbers: use it when that is small, else
:class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian` or a matrix-free route
(``benchmarks/bench_step.py``, sections ``accuracy`` and ``memory``, compares the routes).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from pyro_viking.linalg.operators import JacobianOperator

__all__ = [
    "DEFAULT_VMAP_MAX_ELEMENTS",
    "PerExampleJacobian",
    "autograd_bilinear",
    "evaluate_rows",
    "forward_jacobian_columns",
    "gram64",
    "jacobian_loop",
]

RowFn = Callable[[Tensor], Tensor]

#: Largest ``B·D`` for which ``PerExampleJacobian(vectorize=None)`` uses vmap: above it the
#: batched reverse pass (B² work in data-parallel layers, a ``(B, D)`` buffer per slice of z)
#: loses to the loop in time and memory. The crossover is measured with
#: ``benchmarks/bench_step.py``; see ``benchmarks/README.md`` (``per_example.py``).
DEFAULT_VMAP_MAX_ELEMENTS = 2**21
#: Float64 elements per column chunk of :meth:`PerExampleJacobian.gram` (32 MiB).
_GRAM_CHUNK_ELEMENTS = 2**22


def gram64(M: Tensor, chunk_columns: int) -> Tensor:
    """``M Mᵀ`` ``(n, n)`` in float64 for ``M`` ``(n, D)``, accumulated over chunks of
    ``chunk_columns`` columns: a float32 Gram would bury small singular values in rounding, and
    a float64 copy of the whole M would double its memory (a float32 chunk is copied into one
    reused float64 buffer; a float64 M is read in place)."""
    n, D = M.shape
    step = max(1, int(chunk_columns))
    G = M.new_zeros(n, n, dtype=torch.float64)
    buf = None if M.dtype == torch.float64 else M.new_empty(n, min(D, step), dtype=torch.float64)
    for s in range(0, D, step):
        c = M[:, s:s + step]
        if buf is not None:
            c = buf[:, :c.shape[1]].copy_(c)
        G.addmm_(c, c.T)
    return G


def evaluate_rows(fn: RowFn, z: Tensor) -> Tensor:
    """``fn(z)``, validated to be a 1-D tensor of per-datum values ``(B,)``."""
    if not isinstance(z, Tensor) or z.dim() != 1:
        raise ValueError(f"z must be a 1-D tensor (D,), got shape {tuple(getattr(z, 'shape', ()))}")
    rows = fn(z)
    if not isinstance(rows, Tensor) or rows.dim() != 1:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(
            f"fn must return the per-datum values as a 1-D tensor (B,), got {shape}; sum the "
            "log-likelihood over event and non-data dimensions first"
        )
    return rows


def autograd_bilinear(fn: RowFn, z: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``Σ_k U_k J(z) V_kᵀ`` with ``J = ∂fn/∂z``, differentiable w.r.t. ``z``, ``U`` and ``V``.

    One forward of ``fn`` and K reverse passes with ``create_graph=True``:
    ``Σ_k ⟨U_k J, V_k⟩`` where ``U_k J = ∇_z ⟨U_k, fn(z)⟩``.  Its gradient w.r.t. ``z`` is the
    second-order term needed by implicit differentiation of the projection.

    :param U: ``(K, B)``.  :param V: ``(K, D)``.  :returns: a scalar.
    """
    if U.dim() != 2 or V.dim() != 2 or U.shape[0] != V.shape[0]:
        raise ValueError(f"U (K, B) and V (K, D) expected, got {tuple(U.shape)}, {tuple(V.shape)}")
    with torch.enable_grad():
        x = z if z.requires_grad else z.detach().requires_grad_()
        rows = evaluate_rows(fn, x)
        total = rows.new_zeros(())
        if not rows.requires_grad:  # the rows do not depend on z: J = 0
            return total
        for k in range(U.shape[0]):
            (g,) = torch.autograd.grad(rows, x, U[k], create_graph=True, retain_graph=True,
                                       allow_unused=True)
            if g is not None:
                total = total + (g * V[k]).sum()
    return total


def forward_jacobian_columns(fn: RowFn, z: Tensor, idx: Tensor, B: int) -> Tensor:
    """Columns ``idx`` (R,) of the Jacobian, ``(B, R)``, by forward mode: ``J e_r`` for the unit
    vectors ``e_r``, as one vmapped ``jvp`` (a loop of R jvps when vmap fails)."""
    R = idx.numel()
    E = torch.zeros(R, z.numel(), dtype=z.dtype, device=z.device)
    E[torch.arange(R, device=z.device), idx] = 1

    def jvp(v: Tensor) -> Tensor:
        # cast: jvp of a 0-dim float32 value times a Python float gives a float64 tangent
        return torch.func.jvp(fn, (z,), (v,))[1].to(z.dtype)

    try:
        cols = torch.func.vmap(jvp)(E)
    except (RuntimeError, NotImplementedError):
        cols = torch.stack([jvp(e) for e in E]) if R else z.new_zeros(0, B)
    return cols.T.reshape(B, R).detach().contiguous()


def _all_finite(J: Tensor) -> bool:
    """``torch.isfinite(J).all()`` by row chunks: ``isfinite`` of a whole large J allocates
    ``|J|`` and a boolean copy of J at once."""
    step = max(1, _GRAM_CHUNK_ELEMENTS // max(J.shape[1], 1))
    return all(bool(torch.isfinite(J[i:i + step]).all()) for i in range(0, J.shape[0], step))


def _jacobian_vmap(fn: RowFn, z: Tensor, B: int, chunk_size: Optional[int]) -> Tensor:
    """``(B, D)`` Jacobian as ``vmap(vjp_fn)(I_B)``."""
    _, vjp_fn = torch.func.vjp(fn, z)
    eye = torch.eye(B, dtype=z.dtype, device=z.device)
    return torch.func.vmap(vjp_fn, chunk_size=chunk_size)(eye)[0].to(z.dtype)


def jacobian_loop(rows: Tensor, z: Tensor) -> Tensor:
    """``(B, D)`` Jacobian of ``rows`` ``(B,)`` w.r.t. ``z`` ``(D,)`` from B reverse passes into a
    preallocated tensor (zeros where a row does not depend on z); grad mode must be on."""
    B, D = rows.shape[0], z.shape[0]
    J = torch.zeros(B, D, dtype=z.dtype, device=z.device)
    if not rows.requires_grad:
        return J
    for i in range(B):
        (g,) = torch.autograd.grad(rows[i], z, retain_graph=i < B - 1, allow_unused=True)
        if g is not None:
            J[i] = g
    return J


class PerExampleJacobian(JacobianOperator):
    """An explicit ``(B, D)`` Jacobian: ``J = ∂fn/∂z ∈ R^{B×D}`` at ``z``, built once, or a
    given matrix (:meth:`from_matrix`).

    :param fn: ``z (D,) -> rows (B,)``, the per-datum log-likelihoods.
    :param z: the point ``(D,)``; ``params = (z,)`` and :meth:`bilinear` is differentiable
        w.r.t. it (re-evaluating ``fn`` with double backward).
    :param vectorize: ``True``: try ``vmap`` over ``vjp`` first; ``False``: the loop of B
        reverse passes; ``None`` (default): vmap when ``B·D ≤`` :data:`DEFAULT_VMAP_MAX_ELEMENTS`.
    :param chunk_size: passed to ``torch.func.vmap`` to bound the memory of the vectorised
        reverse pass (``None``: all B cotangents at once).

    ``mv(V) = V Jᵀ`` and ``rmv(U) = U J`` are matmuls; :meth:`gram` is ``J Jᵀ`` in float64,
    computed once.  ``self.vectorized`` records which route built J.
    """

    has_cheap_gram = True
    backend_name = "per_example"

    def __init__(self, fn: RowFn, z: Tensor, *, vectorize: Optional[bool] = None,
                 chunk_size: Optional[int] = None):
        x = z.detach()
        with torch.enable_grad():
            x = x.requires_grad_()
            rows = evaluate_rows(fn, x)
        B, D = rows.shape[0], x.shape[0]
        super().__init__((B, D), z.dtype, z.device)
        self.fn, self.z = fn, z
        self.vectorized = False
        J = None
        if vectorize is None:
            vectorize = B * D <= DEFAULT_VMAP_MAX_ELEMENTS
        if vectorize:
            try:
                J = _jacobian_vmap(fn, z.detach(), B, chunk_size)
                self.vectorized = True
            except (RuntimeError, NotImplementedError):
                J = None  # e.g. random ops or operators without a batching rule
        if J is None:
            # whatever the caller's mode (prediction under no_grad projects lazily): indexing
            # the rows under no_grad would cut them from the graph
            with torch.enable_grad():
                J = jacobian_loop(rows, x)
        J = J.detach()
        if not _all_finite(J):
            raise ValueError("the per-example Jacobian contains non-finite values (NaN or inf); "
                             "check the model's log-likelihood at the current parameters")
        self.J = J
        self._gram: Optional[Tensor] = None

    @classmethod
    def from_matrix(cls, J: Tensor) -> PerExampleJacobian:
        """The operator of an explicit matrix ``J`` ``(B, D)``; ``params = (J,)``, so a projection
        built on it is differentiable w.r.t. J itself."""
        if not isinstance(J, Tensor) or J.dim() != 2:
            raise ValueError(
                f"J must be a 2-D tensor of shape (B, D), got "
                f"{tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__}")
        if not _all_finite(J.detach()):
            raise ValueError("J contains non-finite values (NaN or inf); check the model's "
                             "log-likelihood at the current parameters")
        op = cls.__new__(cls)
        JacobianOperator.__init__(op, J.shape, J.dtype, J.device)
        op.fn, op.z, op.J, op.vectorized, op._gram = None, None, J, False, None
        return op

    @property
    def params(self) -> Tuple[Tensor, ...]:
        return (self.J,) if self.fn is None else (self.z,)

    def mv(self, V: Tensor) -> Tensor:
        return V @ self.J.T

    def rmv(self, U: Tensor) -> Tensor:
        return U @ self.J

    def to_dense(self) -> Tensor:
        return self.J

    def gram(self) -> Tensor:
        """``J Jᵀ`` in float64 (:func:`gram64`, chunks of ``_GRAM_CHUNK_ELEMENTS``), computed
        once."""
        if self._gram is None:
            B = self.shape[0]
            self._gram = gram64(self.J.detach(), _GRAM_CHUNK_ELEMENTS // max(B, 1))
        return self._gram

    def bilinear(self, U: Tensor, V: Tensor) -> Tensor:
        """``Σ_k U_k J V_kᵀ``, differentiable w.r.t. ``z`` (and U, V) when ``z`` requires grad
        (w.r.t. J for :meth:`from_matrix`)."""
        if self.fn is None or not self.z.requires_grad:
            return (U * self.mv(V)).sum()
        return autograd_bilinear(self.fn, self.z, U, V)
