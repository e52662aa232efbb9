r"""Data-parallel VIKING on ``torch.distributed``: W processes (ranks), each on its own part of
every minibatch, keep one set of parameters by averaging their gradients.

Inside a process group (``torchrun``, or ``torch.distributed.init_process_group``), with the
ELBO module of :mod:`pyro_viking.infer.module` on every rank::

    seed_rank(seed)                                   # this rank's own noise stream
    loader = shard_loader(dataset, batch_size=B)      # B / W rows per rank and step
    bnn = BayesianNetwork(net, ..., num_data=len(dataset))
    elbo = setup_parameters(TraceViking_ELBO(beta)(bnn, guide), *first_local_batch)
    broadcast_parameters(elbo)                        # rank 0's initial values everywhere
    optimizer = torch.optim.Adam(elbo.parameters(), lr=lr)
    for epoch in range(num_epochs):
        loader.sampler.set_epoch(epoch)               # a new shuffle, the same on every rank
        for x, y in loader:
            data_parallel_step(elbo, optimizer, x, y)

**The objective.** Rank r's loss on its ``B_r`` rows is the model's own minibatch loss,
``ℓ_r = (N / B_r) Σ_{i ∈ rank r} −log p(y_i | z_r) + β KL(q_r ‖ p)`` (the model scales its
likelihood by ``N / B_r``: a :class:`~pyro_viking.BayesianNetwork` built with
``num_data=N``). Averaging gradients averages the losses:
``(1/W) Σ_r ℓ_r = (N / B) Σ_{i ∈ batch} −log p(y_i | z_{r(i)}) + β · (1/W) Σ_r KL(q_r ‖ p)``
when every ``B_r = B / W`` (the sampler and loader drop the ragged end): the likelihood of the
whole minibatch of ``B`` at its ``N / B`` scale, and the KL once (every rank's KL term has the
same ``θ̂`` and scales; averaging, not summing, counts it once).

**The projection** is per rank: rank r samples ``z_r`` from its guide's ``q_r`` with the
projector onto the kernel of *its* rows' Jacobian and carries its own kernel samples (the
paper's stochastic alternating projections at batch ``B / W``, with no communication beyond the
gradients). The KL of ``q_r`` counts the image dimension of ``B / W`` rows. A projection on the
global batch would need an all-reduce of ``Jᵀ u`` at every solver iteration; it is not done
in training. For prediction, ``guide.project_training_data(x_shard, y_shard, distributed=True)``
on every rank projects the prediction samples exactly onto the kernel of all ranks' rows
together (:mod:`pyro_viking.linalg.distributed_projection`; ``docs/scaling_out.md``).

**Random numbers.** Every rank has its own noise stream (:func:`seed_rank`); the data order is
the sampler's, seeded alike on every rank (``DistributedSampler`` semantics: the shards of an
epoch partition one permutation, which ``set_epoch`` redraws).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pyro_viking.linalg.distributed_projection import world

__all__ = ["average_gradients", "broadcast_parameters", "check_num_data",
           "data_parallel_step", "rank_and_world_size", "rank_seed", "seed_rank",
           "shard_loader"]


def rank_and_world_size() -> Tuple[int, int]:
    """``(rank, W)`` in the current process group; ``(0, 1)`` outside one."""
    return world()


def rank_seed(seed: int, rank: Optional[int] = None) -> int:
    """The seed of rank ``rank``'s noise stream (default: this process's rank): distinct per
    rank, a function of ``(seed, rank)`` alone (``numpy.random.SeedSequence`` spawn keys)."""
    rank = rank_and_world_size()[0] if rank is None else int(rank)
    return int(np.random.SeedSequence(int(seed), spawn_key=(rank,)).generate_state(1)[0])


def seed_rank(seed: int) -> int:
    """``pyro.set_rng_seed(rank_seed(seed))`` (torch, numpy, random): this rank's own noise
    stream. Returns the seed set."""
    value = rank_seed(seed)
    pyro.set_rng_seed(value)
    return value


def shard_loader(dataset: Dataset, batch_size: int, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 **loader_options) -> DataLoader:
    """This rank's ``DataLoader`` of global minibatches of ``batch_size`` (``B``): a
    ``DistributedSampler`` (shuffled with ``seed``, the ragged end dropped) gives rank r every
    W-th index of one permutation of the data set, in batches of ``B / W`` (``ValueError``
    unless W divides ``B``). Call ``loader.sampler.set_epoch(epoch)`` before each epoch for a
    new permutation. ``rank``, ``world_size``: default the process group's."""
    group_rank, group_size = rank_and_world_size()
    rank = group_rank if rank is None else rank
    world_size = group_size if world_size is None else world_size
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is the global minibatch, split evenly over "
                         f"the {world_size} ranks: use a multiple of {world_size}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                      drop_last=True, **loader_options)


def check_num_data(model: nn.Module, num_data: int) -> None:
    """``ValueError`` with the fix unless ``model`` (a :class:`~pyro_viking.BayesianNetwork`,
    or any model with a ``num_data`` attribute) scales its likelihood to ``num_data`` rows:
    without it every rank would weigh its ``B / W`` rows as the whole data set."""
    have = getattr(model, "num_data", num_data)
    if have != num_data:
        raise ValueError(f"the model's num_data is {have}, the data set has {num_data} rows: "
                         f"build it with num_data={num_data} (each rank sees minibatches of it)")


def _trained(module: nn.Module) -> Iterable[Tensor]:
    return [p for p in module.parameters() if p.grad is not None]


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s values (after
    :func:`~pyro_viking.infer.module.setup_parameters`, so that the lazily made ones exist)."""
    if rank_and_world_size()[1] == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):  # once: one call per tensor
        dist.broadcast(t.data, src)


def _unflatten(flat: Tensor, tensors: Iterable[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def average_gradients(module: nn.Module) -> None:
    """Replace the gradient of every parameter of ``module`` that has one by its mean over the
    ranks (one all-reduce of the flattened gradients). Every rank must hold gradients for the
    same parameters (one training step of the same modules does)."""
    params = _trained(module)
    world = rank_and_world_size()[1]
    if world == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    _unflatten(flat, [p.grad for p in params])


def data_parallel_step(elbo: nn.Module, optimizer: torch.optim.Optimizer, *args,
                       **kwargs) -> float:
    """One data-parallel step on this rank's part of the minibatch: ``loss = elbo(*args,
    **kwargs)``, its backward, :func:`average_gradients`, ``optimizer.step()``. Returns this
    rank's loss (average it over ranks for a log)."""
    optimizer.zero_grad()
    loss = elbo(*args, **kwargs)
    loss.backward()
    average_gradients(elbo)
    optimizer.step()
    return float(loss.detach())
