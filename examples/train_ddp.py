"""Data-parallel VIKING: a Bayesian MLP on scikit-learn's digits, trained by W processes.

    torchrun --nproc_per_node=2 examples/train_ddp.py            # W = 2 (CPU, gloo)
    torchrun --nproc_per_node=1 examples/train_ddp.py            # W = 1, the same run
    python examples/train_ddp.py                                 # W = 1 without torchrun

Each rank trains the ELBO module (``TraceViking_ELBO(beta)(bnn, guide)`` with
``module_local_params`` on; :mod:`pyro_viking.infer.module`) on its shard of every global
minibatch of ``--batch-size`` rows, with its own noise stream, and the ranks average their
gradients (:mod:`pyro_viking.infer.distributed`): the likelihood of the whole minibatch at its
``N / B`` scale plus the β-weighted KL, once. Each rank projects on the kernel of its own rows'
Jacobian. Rank 0 prints the training throughput (examples per second over all ranks, set-up
excluded) and the test accuracy and NLL of the posterior mean θ̂. ``docs/scaling_out.md`` has
the figures measured on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import time

import pyro
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer.distributed import (
    broadcast_parameters,
    check_num_data,
    data_parallel_step,
    rank_and_world_size,
    seed_rank,
    shard_loader,
)
from pyro_viking.infer.module import setup_parameters


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global minibatch B")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--smoke", action="store_true", help="one short epoch (CI)")
    return parser.parse_args()


def digits():
    """Standardised digits (1,797 images of 8×8 pixels, 10 classes): 80 % train, 20 % test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    to = torch.get_default_dtype()
    return (torch.as_tensor((x_train - mean) / std, dtype=to), torch.as_tensor(y_train),
            torch.as_tensor((x_test - mean) / std, dtype=to), torch.as_tensor(y_test))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank, world = rank_and_world_size()
    pyro.settings.set(module_local_params=True)  # before the guide is built
    x_train, y_train, x_test, y_test = digits()
    data = TensorDataset(x_train, y_train)
    loader = shard_loader(data, batch_size=args.batch_size, seed=args.seed)

    pyro.set_rng_seed(args.seed)  # the same network on every rank (broadcast anyway)
    net = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    bnn = BayesianNetwork(net, "classification", prior_scale="learned", num_data=len(data))
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = TraceViking_ELBO(beta=args.beta)(bnn, guide)
    check_num_data(bnn, len(data))
    seed_rank(args.seed)  # this rank's noise stream
    setup_parameters(elbo, *next(iter(loader)))
    broadcast_parameters(elbo)
    optimizer = torch.optim.Adam(elbo.parameters(), lr=args.lr)

    epochs, steps = (1, 5) if args.smoke else (args.epochs, None)
    if world > 1:
        dist.barrier()
    start, done = time.perf_counter(), 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            if steps is not None and step == steps:
                break
            loss = data_parallel_step(elbo, optimizer, x, y)
            done += args.batch_size
        if rank == 0:
            sigma_im, sigma_ker = float(guide.image_scale.detach()), float(guide.kernel_scale)
            print(f"epoch {epoch}: loss {loss:.1f} (rank 0), sigma_im {sigma_im:.3g}, "
                  f"sigma_ker {sigma_ker:.3g}")
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        with torch.no_grad():
            logits = bnn.set_weights(guide.median())(x_test)  # the network at θ̂
            nll = F.cross_entropy(logits, y_test).item()
            accuracy = (logits.argmax(-1) == y_test).double().mean().item()
        print(f"W = {world}: {done / seconds:.0f} examples/s ({done} examples in "
              f"{seconds:.1f} s); theta-hat test accuracy {accuracy:.3f}, NLL {nll:.3f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
