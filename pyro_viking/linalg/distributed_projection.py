"""Projection onto the kernel of a Jacobian whose rows are sharded across the ranks of a
``torch.distributed`` process group.

Rank r holds ``J_r`` (``B_r × D``, any :class:`~pyro_viking.linalg.operators.JacobianOperator`);
the Jacobian is their union in rank order, ``J = [J_0; …; J_{W−1}]`` (``N = Σ_r B_r`` rows), and
the projection is the one of a single process holding every row,

    P E = E − Λ J,     Λ (J Jᵀ) = E Jᵀ,

with the same solvers (:class:`~pyro_viking.linalg.projectors.KernelProjector` on a
:class:`ShardedJacobian`). The two products are collectives:

* ``E Jᵀ`` (``mv``): each rank computes its ``E J_rᵀ`` ``(K, B_r)``; an all-gather gives every
  rank the whole ``(K, N)``;
* ``Λ J = Σ_r Λ_r J_r`` (``rmv``): each rank multiplies its columns of Λ, an all-reduce of the
  ``(K, D)`` partial sums adds them.

The Gram ``J Jᵀ`` of the direct solvers (Cholesky, eigh) is assembled once: each rank's own block
from its operator's Gram, the blocks ``J_r J_sᵀ`` across ranks from the dense rows ``J_s``, which
each rank broadcasts in turn (one ``B_s × D`` block in memory at a time), in float64; an
all-gather of the row blocks gives every rank the same ``N × N`` Gram (symmetrised). CG needs
no Gram: each iteration is one ``mv`` and one ``rmv``, an all-gather of ``(K, N)`` and an
all-reduce of ``(K, D)``, and never holds more than the rank's own rows. Its iterates and inner
products are replicated, so every rank takes the same steps and stops together, and a CG that
stops short warns with its residual on every rank, as the single-process solver does.

Every vector to project must be the same on every rank (:func:`broadcast_from`), and every call
(building, projecting, ``gram``, ``rank``, ``diag``) is collective: every rank makes it, in the
same order. The results are bitwise identical on every rank (all-gathers copy, and an all-reduce
leaves the same sum everywhere). Outside a process group the world is this one process: the
local operator, unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from pyro_viking.linalg import layer_gram
from pyro_viking.linalg.operators import JacobianOperator
from pyro_viking.linalg.projectors import KernelProjector

__all__ = ["ShardedJacobian", "StackedJacobian", "broadcast_from", "check_replicated",
           "raise_together", "sharded_projector", "stack_rows", "world"]

#: float64 elements per column chunk of the cross-rank Gram blocks (32 MiB)
_CHUNK_ELEMENTS = 2**22


def world(group=None) -> Tuple[int, int]:
    """``(rank, W)`` of this process in ``group`` (default: the default group); ``(0, 1)``
    outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def broadcast_from(tensor: Tensor, src: int = 0, group=None) -> Tensor:
    """``tensor`` overwritten in place by rank ``src``'s (its rank in ``group``); returned."""
    if world(group)[1] > 1:
        dist.broadcast(tensor, _global_rank(group, src), group=group)
    return tensor


def check_replicated(tensor: Tensor, what: str, group=None) -> None:
    """``ValueError`` on every rank unless ``tensor`` has the same shape and values on every rank
    (compared with rank 0's: an all-gather of the shapes, a broadcast and an all-reduce of a
    flag)."""
    size = world(group)[1]
    if size == 1:
        return
    shapes: List[Optional[tuple]] = [None] * size
    dist.all_gather_object(shapes, tuple(tensor.shape), group=group)
    if len(set(shapes)) > 1:
        raise ValueError(f"{what} must be the same on every rank; its shapes are {shapes}")
    first = broadcast_from(tensor.detach().clone(), 0, group)
    differs = torch.tensor([0.0 if torch.equal(first, tensor.detach()) else 1.0],
                           device=tensor.device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)
    if differs.item():
        raise ValueError(f"{what} differs between the ranks; it must be the same on every rank "
                         "(broadcast it from one rank, or train data-parallel with averaged "
                         "gradients: pyro_viking.infer.distributed)")


def raise_together(error: Optional[BaseException], what: str, group=None,
                   device: Optional[torch.device] = None) -> None:
    """After a step that may fail on some ranks only (``error``: this rank's exception or
    ``None``): re-raise ``error`` on its rank and ``RuntimeError`` on the others, so that no rank
    waits forever in the next collective (one all-reduce of a flag, on ``device``: the
    backend's, e.g. CUDA for NCCL)."""
    if world(group)[1] > 1:
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        if failed.item() and error is None:
            raise RuntimeError(f"{what} failed on another rank (its error is raised there)")
    if error is not None:
        raise error


def _limit(max_dense_bytes: Optional[int]) -> int:
    """``max_dense_bytes``, default :data:`~pyro_viking.linalg.layer_gram.DEFAULT_MAX_DENSE_BYTES`
    (read now, so that changing it takes effect)."""
    return layer_gram.DEFAULT_MAX_DENSE_BYTES if max_dense_bytes is None else max_dense_bytes


def _dense_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    return rows * cols * torch.finfo(dtype).bits // 8


def _cross64(A: Tensor, B: Tensor) -> Tensor:
    """``A Bᵀ`` in float64, accumulated over column chunks (as ``per_example.gram64``)."""
    out = A.new_zeros(A.shape[0], B.shape[0], dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // max(A.shape[0] + B.shape[0], 1))
    for s in range(0, A.shape[1], step):
        out.addmm_(A[:, s:s + step].to(torch.float64), B[:, s:s + step].to(torch.float64).T)
    return out


class StackedJacobian(JacobianOperator):
    """The rows of several operators (the same D), stacked in order: ``J = [J_1; …; J_m]``.

    ``mv`` concatenates the blocks' products, ``rmv`` adds ``U_b J_b`` over the blocks; the Gram
    takes each block's own Gram on the diagonal and float64 products of dense rows across
    blocks. Cheap Gram when every block has one and the dense ``N × D`` rows fit in
    ``max_dense_bytes`` (default as for :class:`ShardedJacobian`)."""

    def __init__(self, blocks: Sequence[JacobianOperator], *,
                 max_dense_bytes: Optional[int] = None):
        blocks = list(blocks)
        if not blocks:
            raise ValueError("StackedJacobian needs at least one operator")
        dims = {b.shape[1] for b in blocks}
        if len(dims) > 1:
            raise ValueError(f"the stacked operators must have the same D, got {sorted(dims)}")
        sizes = [b.shape[0] for b in blocks]
        super().__init__((sum(sizes), dims.pop()), blocks[0].dtype, blocks[0].device)
        self.blocks, self.offsets = blocks, [0] + torch.tensor(sizes).cumsum(0).tolist()
        self.has_cheap_gram = all(b.has_cheap_gram for b in blocks) and (
            _dense_bytes(self.shape[0], self.shape[1], self.dtype) <= _limit(max_dense_bytes))
        self._gram: Optional[Tensor] = None

    def _columns(self, U: Tensor, i: int) -> Tensor:
        return U[:, self.offsets[i]:self.offsets[i + 1]]

    def mv(self, V: Tensor) -> Tensor:
        return torch.cat([b.mv(V) for b in self.blocks], dim=1)

    def rmv(self, U: Tensor) -> Tensor:
        out = self.blocks[0].rmv(self._columns(U, 0))
        for i, b in enumerate(self.blocks[1:], 1):
            out = out + b.rmv(self._columns(U, i))
        return out

    def to_dense(self) -> Tensor:
        return torch.cat([b.to_dense() for b in self.blocks])

    def gram(self) -> Tensor:
        """``J Jᵀ`` in float64, computed once."""
        if self._gram is None:
            dense = [b.to_dense().detach() for b in self.blocks]
            G = torch.zeros(self.shape[0], self.shape[0], dtype=torch.float64,
                            device=self.device)
            for i, (b, Ji) in enumerate(zip(self.blocks, dense)):
                rows = slice(self.offsets[i], self.offsets[i + 1])
                G[rows, rows] = b.gram()
                for j in range(i + 1, len(dense)):
                    cols = slice(self.offsets[j], self.offsets[j + 1])
                    G[rows, cols] = _cross64(Ji, dense[j])
                    G[cols, rows] = G[rows, cols].T
            self._gram = G
        return self._gram

    def release_graph(self) -> None:
        for b in self.blocks:
            b.release_graph()


def stack_rows(blocks: Sequence[JacobianOperator]) -> JacobianOperator:
    """The one operator itself, else a :class:`StackedJacobian` of ``blocks``."""
    blocks = list(blocks)
    return blocks[0] if len(blocks) == 1 else StackedJacobian(blocks)


class ShardedJacobian(JacobianOperator):
    """The union ``J = [J_0; …; J_{W−1}]`` (``N × D``) of the ranks' local operators ``J_r``,
    every product a collective (module docstring). Building it is collective too: the ranks
    exchange their row counts and D (``ValueError`` on every rank when the Ds differ).

    :param local: this rank's rows ``J_r`` (at least one row).
    :param group: the process group (default: the default group; none: this process alone).
    :param max_dense_bytes: ``has_cheap_gram`` (the direct solvers of ``solver="auto"``) when
        every local operator has a cheap Gram and every rank's dense rows ``B_r × D`` fit in
        this many bytes (the Gram assembly broadcasts them); default
        :data:`~pyro_viking.linalg.layer_gram.DEFAULT_MAX_DENSE_BYTES`, read at build time.
        Else CG. With one rank: the local operator's own ``has_cheap_gram``.

    ``params`` is empty: a sharded projection is not differentiated (prediction samples).
    """

    def __init__(self, local: JacobianOperator, *, group=None,
                 max_dense_bytes: Optional[int] = None):
        B, D = local.shape
        super().__init__((B, D), local.dtype, local.device)
        self.local, self.group = local, group
        self.rank, self.world_size = world(group)
        info = torch.tensor([B, D, int(local.has_cheap_gram)], dtype=torch.long,
                            device=local.device)
        if self.world_size > 1:
            gathered = [torch.empty_like(info) for _ in range(self.world_size)]
            dist.all_gather(gathered, info, group=group)
            info = torch.stack(gathered)
        info = info.reshape(-1, 3)
        if len(set(info[:, 1].tolist())) > 1:
            raise ValueError(f"every rank's Jacobian must have the same number of columns D; "
                             f"got {info[:, 1].tolist()} (rank by rank)")
        self.sizes: List[int] = info[:, 0].tolist()
        self.offsets = [0] + torch.tensor(self.sizes).cumsum(0).tolist()
        self.shape = (self.offsets[-1], D)
        self.has_cheap_gram = bool(info[:, 2].all()) and (
            self.world_size == 1
            or _dense_bytes(max(self.sizes), D, local.dtype) <= _limit(max_dense_bytes))
        self._gram: Optional[Tensor] = None

    @property
    def own_rows(self) -> slice:
        """This rank's rows of the union."""
        return slice(self.offsets[self.rank], self.offsets[self.rank + 1])

    def _all_gather_columns(self, X: Tensor) -> Tensor:
        """The ranks' ``(K, B_r)`` blocks side by side, ``(K, N)`` (padded to the largest)."""
        if self.world_size == 1:
            return X
        width = max(self.sizes)
        padded = X.new_zeros(X.shape[0], width)
        padded[:, :X.shape[1]] = X
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, self.sizes)], dim=1)

    def mv(self, V: Tensor) -> Tensor:
        """``V Jᵀ`` ``(K, N)``: the local products, all-gathered."""
        return self._all_gather_columns(self.local.mv(V).contiguous())

    def rmv(self, U: Tensor) -> Tensor:
        """``U J = Σ_r U_r J_r`` ``(K, D)``: the local product, all-reduced."""
        out = self.local.rmv(U[:, self.own_rows].contiguous()).contiguous()
        if self.world_size > 1:
            dist.all_reduce(out, group=self.group)
        return out

    def gram(self) -> Tensor:
        """``J Jᵀ`` ``(N, N)`` in float64, the same on every rank, assembled once (module
        docstring)."""
        if self._gram is None:
            if self.world_size == 1:
                self._gram = self.local.gram()
                return self._gram
            own = self.local.to_dense().detach().contiguous()
            block = own.new_zeros(own.shape[0], self.shape[0], dtype=torch.float64)
            for s, n in enumerate(self.sizes):
                cols = slice(self.offsets[s], self.offsets[s + 1])
                rows = own if s == self.rank else own.new_empty(n, self.shape[1])
                broadcast_from(rows, s, self.group)
                block[:, cols] = self.local.gram() if s == self.rank else _cross64(own, rows)
            G = self._all_gather_columns(block.T.contiguous())  # (N, N): column blocks
            self._gram = 0.5 * (G + G.T)  # J_r J_sᵀ and J_s J_rᵀ came from two ranks
        return self._gram

    def release_graph(self) -> None:
        self.local.release_graph()


def sharded_projector(local: JacobianOperator, *, group=None, solver: str = "auto",
                      max_dense_bytes: Optional[int] = None, **options) -> KernelProjector:
    """Projector onto the kernel of the union of every rank's rows (``local`` on this rank):
    a :class:`~pyro_viking.linalg.projectors.KernelProjector` (``solver`` and ``options`` as
    there; ``"auto"``: Cholesky when :attr:`ShardedJacobian.has_cheap_gram`, else CG) over a
    :class:`ShardedJacobian`, not differentiable. Collective, as are its calls."""
    op = ShardedJacobian(local, group=group, max_dense_bytes=max_dense_bytes)
    return KernelProjector(op, solver=solver, differentiable=False, **options)
