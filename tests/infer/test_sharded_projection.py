"""Prediction after distributed training: ``project_training_data(x_shard, y_shard,
distributed=True)`` on two gloo processes, each with half of the training rows, against one
process projecting the same samples on all of them (float64, 1e-8 relative).

One spawn (``torch.multiprocessing``, world size 2) runs every two-process check:

* a :class:`~pyro_viking.BayesianNetwork` (layer-Gram backend, Cholesky) after a few
  data-parallel training steps: the projected samples and ``Predictive``'s outputs equal the
  single process's on all rows, and are bitwise the same on both ranks; the samples are rank 0's
  (the ranks were seeded differently); trained further, prediction warns that they are stale
  instead of re-projecting them on one rank's shard;
* a plain Pyro regression: dense per-example Jacobians (Cholesky), and matrix-free ones (CG);
* a model whose data plate is subsampled (each rank's shard walked in batches, stacked: one exact
  projection, not alternating passes) against one process on all rows without subsampling;
* a θ̂ that differs between the ranks, and ``num_passes > 1``: a ``ValueError`` on every rank;
  a rank whose Jacobian cannot be built raises its error, the others a ``RuntimeError``.

The single-process checks: ``distributed=True`` outside a process group is the exact projection
on the process's own rows.
"""


import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from problems import linreg, linreg_data
from process_groups import FORK_IF_AVAILABLE, init_group, run_ranks
from pyro.infer import Predictive
from torch import nn

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer.distributed import average_gradients, broadcast_parameters
from pyro_viking.infer.module import setup_parameters

WORLD, S = 2, 12  # processes, projected samples


# -- process-group plumbing -----------------------------------------------------------------------

def _entry(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    init_group(rank, WORLD, store)
    try:
        for check in (_bnn_after_data_parallel_training, _plain_model, _subsampled_plate,
                      _refusals):
            pyro.clear_param_store()
            check(rank)
    finally:
        tdist.destroy_process_group()


def _gather(t: torch.Tensor) -> list:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    tdist.all_gather(parts, t.contiguous())
    return parts


def _shard(rank: int, *tensors):
    n = tensors[0].shape[0] // WORLD
    return tuple(t[rank * n:(rank + 1) * n] for t in tensors)


def _assert_same_on_ranks(t: torch.Tensor) -> None:
    first, second = _gather(t)
    assert torch.equal(first, second)


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-8) -> None:
    error = float((got - want).norm() / want.norm())
    assert error < tol, error


# -- the checks (each runs on both ranks) ---------------------------------------------------------
def _sgd_steps(elbo, steps: int, *args) -> None:
    """Data-parallel SGD by hand (torch.optim's first use imports torch._dynamo: slow)."""
    for _ in range(steps):
        elbo.zero_grad()
        elbo(*args).backward()
        average_gradients(elbo)
        with torch.no_grad():
            for p in elbo.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad


def _bnn_after_data_parallel_training(rank: int) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 2, generator=g), torch.randint(0, 3, (24,), generator=g)
    x_test = torch.randn(5, 2, generator=g)
    shard = _shard(rank, x, y)
    with pyro.settings.context(module_local_params=True):
        pyro.set_rng_seed(0)
        net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
        bnn = BayesianNetwork(net, "classification", prior_scale=1.0, num_data=24)
        guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
        elbo = setup_parameters(TraceViking_ELBO(beta=0.1)(bnn, guide), *shard)
        broadcast_parameters(elbo)
        pyro.set_rng_seed(10 + rank)  # each rank its own noise
        _sgd_steps(elbo, 3, *shard)
        stale = guide.project_training_data(*shard, num_samples=S, distributed=True)
        # trained on: prediction warns that the samples are stale, and does not re-project on
        # the rank's own shard (although every training call had the same data)
        _sgd_steps(elbo, 1, *shard)
        predictive = Predictive(bnn, guide=guide, num_samples=S, return_sites=["logits"])
        with pytest.warns(UserWarning, match="older loc"):
            predictive(x_test)
        assert guide.projected_samples[1] is stale
        pyro.set_rng_seed(7 if rank == 0 else 99)  # the samples are rank 0's
        k = guide.project_training_data(*shard, num_samples=S, distributed=True)
        assert guide.backend_used == "layer_gram"
        logits = predictive(x_test)["logits"]
        _assert_same_on_ranks(k)
        _assert_same_on_ranks(logits)
        if rank == 0:  # one process, all rows, the same θ̂ and seed
            pyro.set_rng_seed(7)
            k_one = guide.project_training_data(x, y, num_samples=S)
            _assert_close(k, k_one)
            _assert_close(logits, predictive(x_test)["logits"])
            assert float(k.norm()) > 0.1 * float(guide.projected_samples[0].norm())


def _plain_model(rank: int) -> None:
    x, y = linreg_data(8, 12)  # 8 rows, D = 12: a kernel of dimension 4
    x_test = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    for backend, options in (("per_example", None), ("matrix_free", {"rtol": 1e-13})):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoViking(linreg, backend=backend, solver_options=options)
        guide(*_shard(rank, x, y))
        pyro.set_rng_seed(3)
        k = guide.project_training_data(*_shard(rank, x, y), num_samples=S, distributed=True)
        assert guide.backend_used == backend
        predictive = Predictive(linreg, guide=guide, num_samples=S, return_sites=["w"])
        w = predictive(x_test)["w"]
        _assert_same_on_ranks(k)
        _assert_same_on_ranks(w)
        if rank == 0:
            pyro.set_rng_seed(3)
            k_one = guide.project_training_data(x, y, num_samples=S)
            _assert_close(k, k_one)
            _assert_close(w, predictive(x_test)["w"])
            # the loss Jacobian's rows are ∝ x_i
            assert float((k @ x.T).norm()) < 1e-10 * float(k.norm() * x.norm())


def logreg(x, y=None, subsample_size=16):
    """Logistic regression whose data plate is subsampled (``None``: not)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(x[idx] * w).sum(-1)),
                    obs=None if y is None else y[idx])


def _subsampled_plate(rank: int) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 80, generator=g), torch.randint(0, 2, (64,), generator=g).double()
    pyro.set_rng_seed(0)
    guide = AutoViking(logreg)
    guide(*_shard(rank, x, y))
    pyro.set_rng_seed(5)
    k = guide.project_training_data(*_shard(rank, x, y), num_samples=S, distributed=True)
    _assert_same_on_ranks(k)
    if rank == 0:  # two batches of 16 per rank, 64 rows in all: one exact projection
        guide.set_model(lambda x, y=None: logreg(x, y, subsample_size=None))
        pyro.set_rng_seed(5)
        _assert_close(k, guide.project_training_data(x, y, num_samples=S))


def _refusals(rank: int) -> None:
    x, y = linreg_data(8, 12)
    pyro.set_rng_seed(rank)  # a different θ̂ on each rank
    guide = AutoViking(linreg)
    guide(*_shard(rank, x, y))
    with pytest.raises(ValueError, match="differs between the ranks"):
        guide.project_training_data(*_shard(rank, x, y), num_samples=S, distributed=True)
    with pytest.raises(ValueError, match="num_passes must be 1"):
        guide.project_training_data(*_shard(rank, x, y), num_passes=2, distributed=True)
    # a failure on one rank only (a NaN in rank 1's targets): every rank raises, none hangs
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoViking(linreg)
    guide(*_shard(0, x, y))
    y_bad = y.clone()
    y_bad[-1] = float("nan")
    if rank == 0:
        with pytest.raises(RuntimeError, match="failed on another rank"):
            guide.project_training_data(*_shard(rank, x, y_bad), distributed=True)
    else:
        with pytest.raises(ValueError):
            guide.project_training_data(*_shard(rank, x, y_bad), distributed=True)


@pytest.mark.dtype_independent
def test_two_ranks_on_halves_project_and_predict_as_one_process_on_all_rows():
    # forked, not spawned: the ranks start with this process's imports (torch.func's first use
    # imports torch._dynamo, seconds per fresh process)
    import torch._dynamo  # noqa: F401

    run_ranks(_entry, WORLD, start_method=FORK_IF_AVAILABLE)


# -- one process ----------------------------------------------------------------------------------
def test_outside_a_process_group_distributed_is_the_exact_projection_on_own_rows(default_dtype):
    x, y = linreg_data(8, 12)
    guide = AutoViking(linreg)
    guide(x, y)
    pyro.set_rng_seed(3)
    k = guide.project_training_data(x, y, num_samples=S, distributed=True)
    pyro.set_rng_seed(3)
    k_one = guide.project_training_data(x, y, num_samples=S)
    torch.testing.assert_close(k, k_one)
    assert guide.projected_samples[1] is not None


def test_outside_a_process_group_subsampled_batches_are_stacked(default_dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 40, generator=g).to(default_dtype)
    y = torch.randint(0, 2, (32,), generator=g).to(default_dtype)
    guide = AutoViking(logreg)
    guide(x, y)
    k = guide.project_training_data(x, y, num_samples=S, distributed=True)
    alternating = guide.project_training_data(x, y, num_samples=S)
    # the loss Jacobian's rows are ∝ x_i: k is in the kernel of all 32 rows at once, where one
    # alternating pass over the two batches of 16 leaves the first batch's part
    tol = 1e-4 if default_dtype == torch.float32 else 1e-10
    assert float((k @ x.T).norm() / k.norm()) < tol * float(x.norm())
    assert float((alternating @ x.T).norm() / alternating.norm()) > 1e-2 * float(x.norm())
