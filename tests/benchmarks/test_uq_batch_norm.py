"""The benchmark's VIKING on a network with batch norms in training mode
(benchmarks/uq/batch_norm_fit.py): the model runs them on running statistics, and the warm-up
is the PyTorch MAP at the tempered warm-up objective, copied into the model.

Skipped unless scikit-learn imports (the digits data)."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ belongs to the checkout, not to the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.uq.batch_norm_fit import batch_norm_mode, pytorch_warmup  # noqa: E402
from benchmarks.uq.methods import train_map  # noqa: E402
from benchmarks.uq.networks import MLP, SmallResNet  # noqa: E402
from benchmarks.uq.protocol import budget_for  # noqa: E402
from benchmarks.uq.pyro_models import INIT_PRIOR_SCALE  # noqa: E402
from benchmarks.uq.tasks import quick_task  # noqa: E402
from benchmarks.uq.viking_fit import make_bnn  # noqa: E402

pytestmark = pytest.mark.dtype_independent


def test_batch_norms_in_training_mode_run_on_running_statistics():
    assert batch_norm_mode(SmallResNet(8)) == "running"
    assert batch_norm_mode(SmallResNet(8).eval()) is None  # frozen: the library's default
    assert batch_norm_mode(MLP(4, (8,), 3)) is None
    task = quick_task("digits_resnet")
    assert make_bnn(task, 0, 64).batch_norm == "running"
    assert make_bnn(quick_task("digits"), 0, 64).batch_norm is None


def test_pytorch_warmup_is_the_tempered_map_copied_into_the_model():
    """The model holds the weights and running statistics of the PyTorch MAP at prior scale
    s₀ / √β (the objective of ``fit_viking``'s warm-up), from the seed's initialisation."""
    task, beta = quick_task("digits_resnet"), 1e-3
    budget = budget_for("digits_resnet", quick=True)
    bnn = make_bnn(task, 0, budget.batch_size)
    before = {n: b.clone() for n, b in bnn.net.named_buffers()}
    values, secs = pytorch_warmup(bnn, task, 0, beta, budget, epochs=1)
    reference, _, _ = train_map(task, 0, INIT_PRIOR_SCALE / math.sqrt(beta),
                                replace(budget, epochs=1))
    assert secs > 0 and set(values) == set(bnn.latent_sites)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(bnn.net.state_dict()[name], tensor), name
    for name, p in reference.named_parameters():
        assert torch.equal(values[bnn.site_name(name)], p.detach())
    assert not torch.equal(before["2.running_mean"], bnn.net.state_dict()["2.running_mean"])
    assert bnn.net.training  # still trains its statistics in the ELBO phase
