"""Shared test set-up: every test runs in float64, seeded, with Pyro validation on and an empty
param store (as in pyro-ppl/pyro ``tests/conftest.py``)."""

import importlib.util
import os
import sys

import pyro
import pytest
import torch

# Run from a checkout without installing the package: make the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("pyro_viking") is None:
    sys.path.insert(0, _ROOT)

SEED = 0

# The suite is many small tensor operations: one intra-op thread is faster, and avoids OpenMP
# oversubscription (100× slow-downs) when other processes share the cores.
torch.set_num_threads(int(os.environ.get("PYRO_VIKING_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _float64_seeded_validated():
    """float64 default dtype, fixed seeds (torch, numpy, random), validation, clean params."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(SEED)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(old_dtype)


@pytest.fixture
def generator():
    """A seeded ``torch.Generator`` for tests that want their own random stream."""
    return torch.Generator().manual_seed(SEED)
