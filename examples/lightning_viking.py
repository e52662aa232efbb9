"""VIKING under PyTorch Lightning: a Bayesian MLP on scikit-learn's digits, trained by
``Trainer(strategy="ddp", accelerator="cpu", devices=2)``.

    python examples/lightning_viking.py                 # 2 CPU ranks, 10 epochs
    python examples/lightning_viking.py --smoke         # a few steps on a slice of the data (CI)
    python examples/lightning_viking.py --devices 1     # one process, the same recipe

The ``LightningModule`` holds the ELBO module (``TraceViking_ELBO(beta)(bnn, guide)`` with
``module_local_params`` on; :mod:`pyro_viking.infer.module`): ``training_step`` returns its
loss on the rank's rows, ``configure_optimizers`` an Adam over its parameters (Pyro's
``examples/svi_lightning.py`` pattern). After training, rank 0 projects posterior samples on the
whole training set (``guide.project_training_data``) and prints the validation NLL of the
posterior predictive (``Predictive``, the average of the sampled networks' probabilities) and
of the network at θ̂.

**What Lightning's DDP does, and what is added** (the rules of
:mod:`pyro_viking.infer.distributed`):

* *KL once.* Lightning wraps the module in ``DistributedDataParallel``, which averages the
  gradients over the ranks: the mean of the ranks' losses ``(N / B_r) Σ lik + β KL``, i.e. the
  global minibatch's likelihood and the KL counted once. Nothing added.
* *Rank 0's initial parameters.* DDP broadcasts rank 0's parameters and buffers when it wraps
  the module, but only those that exist then: Pyro creates the guide's parameters at its first
  call, so the ``setup`` hook (which Lightning runs on every rank before wrapping) calls
  :func:`~pyro_viking.infer.module.setup_parameters` on one batch.
* *Sharded data.* Lightning would put a ``DistributedSampler`` of its own into the loader
  (padding the data set by repeating rows, so the last batch of a rank may be smaller);
  ``use_distributed_sampler=False`` keeps :func:`~pyro_viking.infer.distributed.shard_loader`,
  which drops the ragged end so that every rank has ``B / W`` rows at every step. Lightning
  still calls its sampler's ``set_epoch`` at each epoch (a new shuffle, the same on all ranks).
* *Per-rank noise.* Lightning seeds every rank alike (``seed_everything``); the ``setup`` hook
  calls :func:`~pyro_viking.infer.distributed.seed_rank`, a noise stream per rank.
* *Unused parameters.* The weights of the network that ``BayesianNetwork`` wraps are θ̂'s
  initial values, never trained (no gradient), which plain DDP refuses; after set-up they are
  frozen (``requires_grad_(False)``), so ``strategy="ddp"`` works without
  ``find_unused_parameters=True``.

*Threads.* Lightning sets ``cpu_count // devices`` torch threads a rank unless
``OMP_NUM_THREADS`` is set; the example sets it to ``--threads`` (default 1: W ranks on W
cores, and no thread oversubscription on a shared machine).

With ``--smoke`` rank 0 also prints the checks that the parameters are the same on every rank
after training and that the ranks drew different noise (``tests/infer/test_lightning.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import pyro
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pyro.infer import Predictive
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_ddp import digits  # noqa: E402  (the same data as examples/train_ddp.py)

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO  # noqa: E402
from pyro_viking.infer.distributed import check_num_data, seed_rank, shard_loader  # noqa: E402
from pyro_viking.infer.module import setup_parameters  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU ranks W")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global minibatch B")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=100, help="posterior samples S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--smoke", action="store_true", help="a few steps, tiny data (CI)")
    return parser.parse_args()


class VikingModule(pl.LightningModule):
    """The ELBO module of ``bnn`` and ``guide`` as a ``LightningModule`` (module docstring)."""

    def __init__(self, bnn: BayesianNetwork, guide: AutoViking, data: TensorDataset, *,
                 beta: float, lr: float, batch_size: int, seed: int):
        super().__init__()
        self.elbo = TraceViking_ELBO(beta=beta)(bnn, guide)
        self.data, self.lr, self.batch_size, self.seed = data, lr, batch_size, seed

    def train_dataloader(self):
        """This rank's shard of every global minibatch (``B / W`` rows)."""
        return shard_loader(self.data, batch_size=self.batch_size, seed=self.seed)

    def setup(self, stage: str) -> None:
        """On every rank, in its process group, before DDP wraps the module."""
        bnn = self.elbo.model
        check_num_data(bnn, len(self.data))
        seed_rank(self.seed)  # this rank's noise stream
        setup_parameters(self.elbo, *next(iter(self.train_dataloader())))
        for name in bnn.latent_shapes:  # θ̂'s initial values: not trained
            bnn.net.get_parameter(name).requires_grad_(False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.elbo(*batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.elbo.parameters() if p.requires_grad],
                                lr=self.lr)

    def on_train_end(self) -> None:
        """The replicas' agreement: every rank's flat parameters and last noise draw."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.elbo.parameters()])
        noise = self.elbo.guide.last_draw[0].reshape(-1)
        self.rank_parameters, self.rank_noise = self.all_gather(flat), self.all_gather(noise)


def validation_nll(bnn: BayesianNetwork, guide: AutoViking, train: TensorDataset,
                   x_val: torch.Tensor, y_val: torch.Tensor, num_samples: int,
                   batch_size: int) -> dict:
    """Validation NLL and accuracy of the posterior predictive (``num_samples`` networks, their
    probabilities averaged; samples projected on the whole training set in batches of
    ``batch_size``) and of the network at θ̂."""
    x, y = train.tensors
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    with torch.no_grad():
        guide.project_training_data(batches=batches, num_samples=num_samples)
        logits = Predictive(bnn, guide=guide, num_samples=num_samples,
                            return_sites=[bnn.output_site])(x_val)[bnn.output_site]
        probs = logits.softmax(-1).mean(0)
        theta_hat = bnn.set_weights(guide.median())(x_val)
    return {"nll": F.nll_loss(probs.clamp_min(1e-12).log(), y_val).item(),
            "accuracy": (probs.argmax(-1) == y_val).double().mean().item(),
            "theta_hat_nll": F.cross_entropy(theta_hat, y_val).item()}


def main() -> None:
    args = parse_args()
    # Lightning sets cpu_count // devices threads unless OMP_NUM_THREADS is set
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data
    pyro.settings.set(module_local_params=True)  # before the guide is built
    x_train, y_train, x_val, y_val = digits()
    if args.smoke:
        x_train, y_train, x_val, y_val = x_train[:256], y_train[:256], x_val[:100], y_val[:100]
        args.batch_size, args.num_samples = 32, 10
    data = TensorDataset(x_train, y_train)

    pyro.set_rng_seed(args.seed)  # the same network on every rank (DDP broadcasts anyway)
    net = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    bnn = BayesianNetwork(net, "classification", prior_scale="learned", num_data=len(data))
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    module = VikingModule(bnn, guide, data, beta=args.beta, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=args.devices,
                         max_epochs=1 if args.smoke else args.epochs,
                         max_steps=6 if args.smoke else -1, use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module)
    if torch.distributed.is_initialized():  # no collectives from here on
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return
    if args.smoke:
        params, noise = module.rank_parameters, module.rank_noise
        same = all(torch.equal(params[0], p) for p in params[1:])
        distinct = all(not torch.equal(noise[0], e) for e in noise[1:])
        print(f"ranks: {trainer.world_size}; the same parameters on every rank: {same}; "
              f"different noise on every rank: {distinct}")
    result = validation_nll(bnn, guide, data, x_val, y_val, args.num_samples, args.batch_size)
    sigma_im, sigma_ker = float(guide.image_scale.detach()), float(guide.kernel_scale)
    print(f"sigma_im {sigma_im:.3g}, sigma_ker {sigma_ker:.3g}")
    print(f"validation NLL {result['nll']:.4f} (posterior predictive, {args.num_samples} "
          f"samples; accuracy {result['accuracy']:.3f}); theta-hat NLL "
          f"{result['theta_hat_nll']:.4f}")


if __name__ == "__main__":
    main()
