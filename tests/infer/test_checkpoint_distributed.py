"""A checkpoint of data-parallel training, saved by rank 0, predicts in one process as rank 0 did.

Two gloo ranks (:func:`pyro_viking.infer.launch`) train a Bayesian MLP with
:mod:`pyro_viking.infer.distributed` (sharded minibatches, a noise stream per rank, averaged
gradients); rank 0 saves the ELBO module's ``state_dict`` (the guide's θ̂ and scales, the model's
learned prior scale: docs/scaling_out.md), then projects posterior samples on the training set
and predicts with ``Predictive`` under a fixed seed. This process builds the same modules, sets
them up on one batch, loads the state and does the same under the same seed: the predictions are
rank 0's, exactly.
"""

import pyro
import pytest
import torch
from pyro.infer import Predictive
from torch import nn
from torch.utils.data import TensorDataset

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.infer import launch
from pyro_viking.infer.distributed import (
    broadcast_parameters,
    data_parallel_step,
    seed_rank,
    shard_loader,
)
from pyro_viking.infer.module import setup_parameters

pytestmark = pytest.mark.dtype_independent

N, B, FEATURES, CLASSES, STEPS = 96, 16, 6, 3, 8
NUM_SAMPLES, PREDICT_SEED = 8, 123


def _data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N + 10, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (N + 10,), generator=g)
    return x[:N], y[:N], x[N:]  # training data, test inputs


def _elbo():
    pyro.set_rng_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    bnn = BayesianNetwork(net, "classification", prior_scale="learned", num_data=N)
    return TraceViking_ELBO(beta=0.5)(bnn, AutoViking(bnn, init_loc_fn=bnn.init_loc_fn))


def _predict(elbo, x_train, y_train, x_test) -> torch.Tensor:
    """Posterior samples projected on the training set, then ``Predictive``'s logits."""
    bnn, guide = elbo.model, elbo.guide
    pyro.set_rng_seed(PREDICT_SEED)
    guide.project_training_data(batches=[(x_train[i:i + B], y_train[i:i + B])
                                         for i in range(0, N, B)], num_samples=NUM_SAMPLES)
    return Predictive(bnn, guide=guide, num_samples=NUM_SAMPLES,
                      return_sites=[bnn.output_site])(x_test)[bnn.output_site]


def _train_and_save(rank: int, world_size: int, path: str) -> dict:
    x, y, x_test = _data()
    with pyro.settings.context(module_local_params=True):
        loader = shard_loader(TensorDataset(x, y), batch_size=B, seed=1)
        elbo = _elbo()
        seed_rank(2)
        setup_parameters(elbo, *next(iter(loader)))
        broadcast_parameters(elbo)
        optimizer = torch.optim.Adam(elbo.parameters(), lr=0.05)
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for xb, yb in loader:
                data_parallel_step(elbo, optimizer, xb, yb)
        if rank == 0:
            torch.save(elbo.state_dict(), path)  # every rank holds the same parameters
        return {"logits": _predict(elbo, x, y, x_test),
                "loc": elbo.guide.loc.detach().clone()}


def test_rank_zero_checkpoint_predicts_in_one_process_as_on_rank_zero(tmp_path):
    path = str(tmp_path / "viking.pt")
    on_rank_zero = launch(_train_and_save, 2, path, num_threads=1, timeout=120)
    x, y, x_test = _data()
    with pyro.settings.context(module_local_params=True):
        elbo = setup_parameters(_elbo(), x[:B // 2], y[:B // 2])
        fresh_loc = elbo.guide.loc.detach().clone()
        elbo.load_state_dict(torch.load(path))
        assert torch.equal(elbo.guide.loc.detach(), on_rank_zero["loc"])
        assert not torch.equal(fresh_loc, on_rank_zero["loc"])  # it did train
        logits = _predict(elbo, x, y, x_test)
    assert logits.shape == (NUM_SAMPLES, len(x_test), CLASSES)
    assert logits.std(0).mean() > 0  # samples of a posterior, not one network
    torch.testing.assert_close(logits, on_rank_zero["logits"], rtol=0, atol=0)
