"""Which plates subsample their data, and which draw the indices at random
(:mod:`pyro_viking.model_trace.subsampling`)."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_viking.model_trace.subsampling import draws_random_indices, subsampled_frames

N = 10


def model(y, subsample_size=None, subsample=None):
    with pyro.plate("outer", 2, dim=-2):
        with pyro.plate("data", N, subsample_size=subsample_size, subsample=subsample) as idx:
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=y[idx])


@pytest.mark.parametrize("kwargs, subsampled, random", [
    (dict(), False, False),
    (dict(subsample_size=N), False, False),
    (dict(subsample_size=4), True, True),
    (dict(subsample=torch.arange(4)), True, False),
])
def test_subsampled_frames_and_random_indices(kwargs, subsampled, random):
    trace = poutine.trace(model).get_trace(torch.randn(N), **kwargs)
    frames = subsampled_frames(trace.nodes["y"])
    assert [f.name for f in frames] == (["data"] if subsampled else [])
    if subsampled:
        assert (frames[0].size, frames[0].full_size, frames[0].dim) == (4, N, -1)
    assert draws_random_indices(trace, "data") is random
    assert draws_random_indices(trace, "not a plate of the model")  # unknown: assume random
