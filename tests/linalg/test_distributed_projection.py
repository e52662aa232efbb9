"""The kernel projection of a Jacobian whose rows are sharded across ranks
(``pyro_viking.linalg.distributed_projection``): build, densify, compare.

Two gloo processes (forked) hold uneven shards (5 and 6 rows) of one ``J``, with a row on rank 1
repeating one of rank 0 (the union's Gram is singular though neither shard's is). For every
solver the sharded projection equals the dense projector of the whole ``J`` and a single process's
``KernelProjector`` on it (float64), is bitwise the same on both ranks, and keeps the identities
(``J P v = 0``, rank, ``diag P``). Also on the ranks: the ``"auto"`` choice and its dense-rows
bound, CG that stops short warns with its residual on every rank, and ``ValueError`` on every
rank for tensors that differ between the ranks or Jacobians of different widths, and an error
on one rank raised on every rank.

One process: :class:`StackedJacobian` against its dense matrix, and outside a process group the
sharded projector is the local one.
"""

import warnings

import pytest
import torch
import torch.distributed as tdist
from problems import dense_projector, jacobian_with_rank
from process_groups import FORK_IF_AVAILABLE, init_group, run_ranks

from pyro_viking.linalg import ConvergenceWarning, DenseProjector, PerExampleJacobian
from pyro_viking.linalg.distributed_projection import (
    ShardedJacobian,
    StackedJacobian,
    broadcast_from,
    check_replicated,
    raise_together,
    sharded_projector,
    stack_rows,
    world,
)
from pyro_viking.linalg.layer_gram import LayerGramJacobian

WORLD, B, D, R = 2, 11, 30, 9  # ranks, rows in all, columns, rank of J
SPLIT = 5  # rank 0: rows 0..4, rank 1: rows 5..10
CG = dict(solver="cg", rtol=1e-13)


def _problem():
    g = torch.Generator().manual_seed(0)
    J = jacobian_with_rank(B - 1, D, R, cond=30.0, generator=g)
    J = torch.cat([J, J[1:2]])  # the last row (rank 1's) repeats row 1 (rank 0's)
    V = torch.randn(4, D, generator=g)
    return J, V



def _entry(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    init_group(rank, WORLD, store)
    try:
        _checks(rank)
    finally:
        tdist.destroy_process_group()


def _softmax_rows(x: torch.Tensor):
    """``z ↦ log softmax(W x_i + b)_0`` for ``z = (W (3×4), b)``, through an ``nn.Linear``."""
    net = torch.nn.Linear(4, 3)

    def rows(z: torch.Tensor) -> torch.Tensor:
        params = {"weight": z[:12].reshape(3, 4), "bias": z[12:]}
        return torch.func.functional_call(net, params, (x,)).log_softmax(-1)[:, 0]

    return rows


def _same_on_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    tdist.all_gather(parts, t.contiguous())
    return torch.equal(parts[0], parts[1])


def _checks(rank: int) -> None:
    assert world() == (rank, WORLD)
    J, V = _problem()
    mine = J[:SPLIT] if rank == 0 else J[SPLIT:]
    reference = V @ dense_projector(J)
    for kw in (dict(solver="eigh"), dict(solver="cholesky"), CG, dict(solver="auto")):
        P = sharded_projector(PerExampleJacobian.from_matrix(mine), **kw)
        assert P.operator.shape == (B, D) and P.operator.sizes == [SPLIT, B - SPLIT]
        X = P(V)
        assert _same_on_ranks(X), kw
        torch.testing.assert_close(X, reference, rtol=1e-8, atol=1e-10)
        one = DenseProjector(J, **({"solver": "cholesky"} if kw is CG else kw))
        torch.testing.assert_close(X, one(V), rtol=1e-8, atol=1e-10)
        assert float((X @ J.T).norm() / (V @ J.T).norm()) < 1e-10
        if kw["solver"] != "cg":
            assert P.solver in ("eigh", "cholesky") and P.rank == R
            assert P.info.method in ("eigh", "cholesky->eigh")  # the union's Gram is singular
            assert _same_on_ranks(P.gram())
            torch.testing.assert_close(P.gram(), J @ J.T, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(P.diag(), dense_projector(J).diagonal(), atol=1e-10,
                                       rtol=0)
    # too large to broadcast the dense rows: "auto" takes CG
    P = sharded_projector(PerExampleJacobian.from_matrix(mine), max_dense_bytes=0, rtol=1e-13)
    assert not P.operator.has_cheap_gram and P.solver == "cg"
    torch.testing.assert_close(P(V), reference, rtol=1e-8, atol=1e-10)
    # CG stopped short: a warning with the residual, on every rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P = sharded_projector(PerExampleJacobian.from_matrix(mine), solver="cg", maxiter=1)
        P(V)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(messages) == 1 and "relative residual" in messages[0], messages
    assert not P.info.converged and P.info.residual > 1e-6
    # layer-Gram shards: each rank's own Gram on its diagonal block, dense rows across
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(4))
    z = torch.randn(15, generator=torch.Generator().manual_seed(5))
    P = sharded_projector(LayerGramJacobian(_softmax_rows(x[:4] if rank == 0 else x[4:]), z))
    Jx = torch.autograd.functional.jacobian(_softmax_rows(x), z)
    assert P.solver == "cholesky" and P.operator.local.num_layers == 1
    torch.testing.assert_close(P.gram(), Jx @ Jx.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P(V[:, :15]), V[:, :15] @ dense_projector(Jx), rtol=1e-8,
                               atol=1e-10)
    # tensors that differ between ranks, and shards of different widths: refused everywhere
    check_replicated(torch.arange(3.0), "same")
    with pytest.raises(ValueError, match="differs between the ranks"):
        check_replicated(torch.tensor([float(rank)]), "value")
    with pytest.raises(ValueError, match="shapes"):
        check_replicated(torch.zeros(rank + 1), "shape")
    with pytest.raises(ValueError, match="same number of columns"):
        ShardedJacobian(PerExampleJacobian.from_matrix(torch.zeros(2, D + rank)))
    assert torch.equal(broadcast_from(torch.tensor([float(rank)])), torch.tensor([0.0]))
    raise_together(None, "nothing")
    with pytest.raises(KeyError if rank == 1 else RuntimeError, match="bad|another rank"):
        raise_together(KeyError("bad") if rank == 1 else None, "a step")


@pytest.mark.dtype_independent
def test_two_ranks_project_on_the_union_of_their_rows():
    run_ranks(_entry, WORLD, start_method=FORK_IF_AVAILABLE)


# -- one process ----------------------------------------------------------------------------------
@pytest.mark.float64_only
def test_stacked_jacobian_is_its_dense_matrix():
    J, V = _problem()
    parts = [J[:3], J[3:7], J[7:]]
    op = StackedJacobian([PerExampleJacobian.from_matrix(p) for p in parts])
    U = torch.randn(4, B)
    assert op.shape == (B, D) and op.has_cheap_gram
    torch.testing.assert_close(op.mv(V), V @ J.T)
    torch.testing.assert_close(op.rmv(U), U @ J)
    torch.testing.assert_close(op.to_dense(), J)
    torch.testing.assert_close(op.gram(), J @ J.T)
    torch.testing.assert_close(sharded_projector(op)(V), V @ dense_projector(J), rtol=1e-8,
                               atol=1e-10)
    single = PerExampleJacobian.from_matrix(J)
    assert stack_rows([single]) is single
    assert not StackedJacobian(op.blocks, max_dense_bytes=0).has_cheap_gram
    with pytest.raises(ValueError, match="same D"):
        StackedJacobian([single, PerExampleJacobian.from_matrix(torch.zeros(1, D + 1))])


def test_outside_a_process_group_the_sharded_projector_is_the_local_one(default_dtype):
    J, V = (t.to(default_dtype) for t in _problem())
    assert world() == (0, 1)
    P = sharded_projector(PerExampleJacobian.from_matrix(J))
    assert P.operator.has_cheap_gram and P.solver == "cholesky"
    assert P.operator.gram() is P.operator.local.gram()
    torch.testing.assert_close(P(V), DenseProjector(J)(V))
    check_replicated(V, "anything")  # nothing to compare with
    assert torch.equal(broadcast_from(V.clone()), V)


@pytest.mark.float64_only
def test_a_layer_gram_shard_keeps_its_own_gram():
    x, z = torch.randn(6, 4), torch.randn(15)
    op = LayerGramJacobian(_softmax_rows(x), z)
    P = sharded_projector(op)
    assert P.operator.gram() is op.gram()
    V = torch.randn(3, 15)
    torch.testing.assert_close(P(V), V @ dense_projector(op.to_dense()), rtol=1e-8, atol=1e-10)
