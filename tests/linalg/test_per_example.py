"""Dense per-example Jacobians (:mod:`pyro_viking.linalg.per_example`): the vmapped route, its
fallback to one reverse pass per row, and the float64 Gram by column chunks."""

import pytest
import torch

from pyro_viking.linalg import PerExampleJacobian
from pyro_viking.linalg.per_example import gram64


def test_vmap_failure_falls_back_to_the_loop_under_no_grad(monkeypatch, default_dtype):
    """Model code that ``torch.func`` cannot vmap falls back to one reverse pass per row, which
    also works under a caller's ``torch.no_grad()``; both give the exact Jacobian."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=default_dtype)
    z = torch.randn(3, dtype=default_dtype)

    def fn(v):
        return torch.tanh(x @ v)

    want = (1 - torch.tanh(x @ z) ** 2)[:, None] * x  # d tanh(x_i · z) / dz
    op = PerExampleJacobian(fn, z, vectorize=True)
    assert op.vectorized
    torch.testing.assert_close(op.J, want)

    def no_vmap(*args, **kwargs):
        raise RuntimeError("model code without a functorch rule")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    with torch.no_grad():
        op = PerExampleJacobian(fn, z, vectorize=True)
    assert not op.vectorized
    torch.testing.assert_close(op.J, want)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_gram64_by_chunks_is_the_float64_gram(default_dtype, chunk):
    M = torch.randn(4, 7, dtype=default_dtype)
    G = gram64(M, chunk)
    assert G.dtype == torch.float64
    M64 = M.double()
    torch.testing.assert_close(G, M64 @ M64.T, rtol=1e-14, atol=1e-14)
    assert gram64(M[:, :0], chunk).count_nonzero() == 0  # D = 0: the zero Gram
