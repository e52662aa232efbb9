"""Data-parallel VIKING on torch.distributed (pyro_viking.infer.distributed), with gloo on CPU.

The acceptance check runs two processes (``torch.multiprocessing.spawn``, world size 2), each on
half of a minibatch, against one process on the whole minibatch with the same noise: the
averaged gradient of every parameter must be the single process's, in float64 to 1e-8
(relative). Each rank projects on the kernel of its own rows' Jacobian, so "the same
projection" needs a construction where that is the single process's projection restricted to
the rank's rows; this one is (honestly) special:

* the model is per-datum-row separable: a linear classifier ``f(x) = W x`` whose inputs on
  rank 0 are zero in the second half of the features and on rank 1 in the first half, so the
  Jacobian rows of rank r live in the columns of block r, ``J Jᵀ`` is block-diagonal and the
  projector of the whole minibatch acts on block r as rank r's does; rank r's likelihood reads
  only block r of the sample;
* every process draws the same noise (the same seed on both ranks, instead of the rank streams
  of ``seed_rank``), with ``image_noise="carried"`` (the image part is ``ε − Pε`` of the one
  D-dimensional draw, not a draw whose size depends on the rows);
* σ_im starts at the prior scale s, which σ_ker is tied to: there the KL's value and its
  gradients do not depend on the kernel dimension R, which differs between a rank
  (``B / 2`` rows) and the whole minibatch (``B``). Away from that point the data-parallel KL
  counts the image dimension of ``B / W`` rows (the per-rank scheme), not of ``B``.

A second run checks what holds in general (a two-layer network, per-rank noise streams): the
shards of each epoch partition one permutation and are reshuffled per epoch, the ranks draw
different noise, after training steps every parameter is the same on both ranks, and
``DistributedDataParallel`` over the ELBO module (``find_unused_parameters=True``: the wrapped
network's own weights get no gradient) takes the same steps as ``data_parallel_step``.
"""


import gc

import pyro
import pytest
import torch
import torch.distributed as dist
from process_groups import init_group, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer.distributed import (
    average_gradients,
    broadcast_parameters,
    check_num_data,
    data_parallel_step,
    rank_seed,
    seed_rank,
    shard_loader,
)
from pyro_viking.infer.module import setup_parameters

WORLD = 2
N, B, K, C = 200, 16, 6, 3  # data set size, global minibatch, features per block, classes
S, BETA = 0.3, 0.5  # initial prior scale (= initial σ_im), KL weight
NOISE_SEED = 11


# -- process-group plumbing -----------------------------------------------------------------------

def _entry(rank: int, worker, store: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    init_group(rank, WORLD, store)
    try:
        with pyro.settings.context(module_local_params=True):
            worker(rank)
    finally:
        dist.destroy_process_group()


def _spawn(worker) -> None:
    run_ranks(_entry, WORLD, worker)


# -- the separable construction -------------------------------------------------------------------
def _block_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 2 * K, generator=g)
    half = B // WORLD
    x[:half, K:] = 0.0  # rank 0's rows: features of block 0 only
    x[half:, :K] = 0.0  # rank 1's rows: block 1
    y = torch.randint(0, C, (B,), generator=g)
    return x, y


def _glm_elbo(hidden: bool):
    """A linear classifier (the weight latent; with ``hidden``, a point-estimated bias)."""
    pyro.set_rng_seed(0)
    net = nn.Linear(2 * K, C, bias=hidden)
    bnn = BayesianNetwork(net, "classification", prior_scale="learned", init_prior_scale=S,
                          num_data=N, latent="weight")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=S,
                       image_noise="carried")
    return TraceViking_ELBO(beta=BETA)(bnn, guide)


def _gradients(elbo, x, y):
    """Loss and gradients of one step on ``(x, y)`` under the common noise seed."""
    pyro.set_rng_seed(NOISE_SEED)
    loss = elbo(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in elbo.named_parameters()
                           if p.grad is not None}


def _same_gradient_as_one_process(rank: int) -> None:
    x, y = _block_data()
    mine = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    elbo = setup_parameters(_glm_elbo(hidden=True), x[mine], y[mine])
    broadcast_parameters(elbo)
    loss, local = _gradients(elbo, x[mine], y[mine])
    average_gradients(elbo)
    averaged = {n: p.grad for n, p in elbo.named_parameters() if p.grad is not None}
    dist.all_reduce(loss)
    if rank != 0:
        return
    reference = setup_parameters(_glm_elbo(hidden=True), x, y)
    full_loss, full = _gradients(reference, x, y)
    assert float(loss) / WORLD == pytest.approx(float(full_loss), rel=1e-10)  # KL once
    names = {"guide.loc_unconstrained", "guide.image_scale_unconstrained",
             "model.local_params.bnn/prior_scale", "model.local_params.bnn/bias"}
    assert names <= full.keys() and averaged.keys() == full.keys() == local.keys()
    for name, g in full.items():
        assert float(g.norm()) > 0, name
        error = float((averaged[name] - g).norm() / g.norm())
        assert error < 1e-8, (name, error)
        assert float((local[name] - g).norm() / g.norm()) > 1e-3, name  # a rank's own differs


@pytest.mark.dtype_independent
def test_two_ranks_on_halves_give_the_gradient_of_one_process_on_the_whole():
    _spawn(_same_gradient_as_one_process)


# -- the general run: shards, noise streams, replicas in sync ------------------------------------
def _mlp_elbo():
    pyro.set_rng_seed(0)
    net = nn.Sequential(nn.Linear(2 * K, 8), nn.Tanh(), nn.Linear(8, C))
    bnn = BayesianNetwork(net, "classification", prior_scale="learned", num_data=48)
    return TraceViking_ELBO(beta=BETA)(bnn, AutoViking(bnn, init_loc_fn=bnn.init_loc_fn))


def _gather(value):
    out = [None] * WORLD
    dist.all_gather_object(out, value)
    return out


def _ranks_stay_in_sync(rank: int) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 2 * K, generator=g), torch.randint(0, C, (48,), generator=g)
    data = TensorDataset(x, y, torch.arange(48))
    loader = shard_loader(data, batch_size=8, seed=1)
    elbo = _mlp_elbo()
    check_num_data(elbo.model, len(data))
    seed_rank(3)
    elbo, twin = (setup_parameters(e, *next(iter(loader))[:2]) for e in (elbo, _mlp_elbo()))
    broadcast_parameters(elbo)
    broadcast_parameters(twin)  # the same module under DDP, on the same noise
    ddp = DistributedDataParallel(twin, find_unused_parameters=True)  # the net's own weights
    optimizer = torch.optim.Adam(elbo.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    seen, noise = [], []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        order = []
        for xb, yb, idx in loader:
            assert len(idx) == 4  # B / W rows per rank
            state = torch.random.get_rng_state()
            data_parallel_step(elbo, optimizer, xb, yb)
            torch.random.set_rng_state(state)
            twin_optimizer.zero_grad()
            ddp(xb, yb).backward()
            twin_optimizer.step()
            order += idx.tolist()
        seen.append(order)
        noise.append(elbo.guide.last_draw[0])
    # DDP's reducer holds the process group: release it before the group is destroyed (a rank
    # that returns early and exits with DDP alive can abort in gloo's teardown)
    del ddp
    gc.collect()
    flat = torch.cat([p.detach().reshape(-1) for p in elbo.parameters()])
    for p, q in zip(elbo.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # DDP averages the same gradients
    seen_all, noise_all, flat_all = _gather(seen), _gather(noise), _gather(flat)
    if rank != 0:
        return
    for epoch in range(2):
        shards = [s[epoch] for s in seen_all]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0] + shards[1])) == 48
    assert seen_all[0][0] != seen_all[0][1]  # reshuffled per epoch
    assert not torch.equal(noise_all[0][0], noise_all[1][0])  # one noise stream per rank
    assert torch.equal(flat_all[0], flat_all[1])  # one set of parameters


@pytest.mark.dtype_independent
def test_ranks_shard_the_data_draw_their_own_noise_and_stay_in_sync():
    _spawn(_ranks_stay_in_sync)


# -- one process ----------------------------------------------------------------------------------
@pytest.mark.float64_only
def test_rank_losses_average_to_the_minibatch_objective(default_dtype):
    """Per rank ``(N / B_r) Σ lik + β KL``; their mean is ``(N / B) Σ lik + β KL`` (the KL
    once), here for a two-layer network at a point where the sample and the KL do not depend
    on the projection (``σ_im = σ_ker``, carried image noise): values and the gradient of θ̂."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(B, 2 * K, generator=g), torch.randint(0, C, (B,), generator=g)

    def elbo():
        pyro.set_rng_seed(0)
        net = nn.Sequential(nn.Linear(2 * K, 8), nn.Tanh(), nn.Linear(8, C))
        bnn = BayesianNetwork(net, "classification", prior_scale=S, num_data=N)
        guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=S,
                           image_noise="carried")
        return TraceViking_ELBO(beta=BETA)(bnn, guide)

    with pyro.settings.context(module_local_params=True):
        halves = [slice(0, B // 2), slice(B // 2, B)]
        parts = [_gradients(setup_parameters(elbo(), x[h], y[h]), x[h], y[h]) for h in halves]
        whole = _gradients(setup_parameters(elbo(), x, y), x, y)
    mean_loss = sum(loss for loss, _ in parts) / 2
    assert float(mean_loss) == pytest.approx(float(whole[0]), rel=1e-12)
    name = "guide.loc_unconstrained"
    mean_grad = sum(grads[name] for _, grads in parts) / 2
    torch.testing.assert_close(mean_grad, whole[1][name], rtol=1e-10, atol=1e-10)


def test_shard_loader_partitions_each_epoch_and_reshuffles():
    data = TensorDataset(torch.arange(50))
    loaders = [shard_loader(data, batch_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    orders = []
    for epoch in range(2):
        shards = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            batches = [b for (b,) in loader]
            assert all(len(b) == 4 for b in batches)
            shards.append(torch.cat(batches).tolist())
        assert not set(shards[0]) & set(shards[1])
        assert len(shards[0]) == len(shards[1]) == 24  # 25 per rank, in whole batches of 4
        orders.append(shards[0])
    assert orders[0] != orders[1]
    with pytest.raises(ValueError, match="multiple of 2"):
        shard_loader(data, batch_size=7, rank=0, world_size=2)


def test_rank_seeds_are_distinct_and_reproducible():
    seeds = [rank_seed(0, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rank_seed(0, r) for r in range(4)]
    assert rank_seed(1, 0) != seeds[0]
    assert seed_rank(5) == rank_seed(5, 0)  # no process group: rank 0


def test_outside_a_process_group_the_collectives_do_nothing():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    module = nn.Module()
    module.p = p
    broadcast_parameters(module)
    average_gradients(module)
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.detach(), torch.ones(3))


def test_num_data_must_be_the_data_set_size():
    bnn = BayesianNetwork(nn.Linear(3, 2), "classification", num_data=10)
    check_num_data(bnn, 10)
    with pytest.raises(ValueError, match="num_data=20"):
        check_num_data(bnn, 20)
    with pytest.raises(ValueError, match="num_data=20"):
        check_num_data(BayesianNetwork(nn.Linear(3, 2), "classification"), 20)
