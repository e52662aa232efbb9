"""The notebook launcher (pyro_viking.infer.launch) with two gloo processes: rank 0's return value
comes back to the caller, every rank runs in one process group with torchrun's environment, a
worker's exception is raised in the caller with its traceback text (the other rank, blocked in a
collective, is stopped), and a run past its timeout is stopped."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from pyro_viking.infer import WorkerError, launch

pytestmark = pytest.mark.dtype_independent


def _sum_of_ranks(rank: int, world_size: int, scale: float) -> dict:
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {"rank": rank, "world_size": world_size, "sum": scale * t, "env": env,
            "threads": torch.get_num_threads(), "pid": os.getpid()}


def test_returns_rank_zero_value_from_a_two_process_group():
    result = launch(_sum_of_ranks, 2, 10.0, num_threads=1, timeout=60)
    assert result["rank"] == 0 and result["world_size"] == 2
    assert torch.equal(result["sum"], torch.tensor([30.0]))  # 10 · (1 + 2): both ranks took part
    assert result["env"] == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                             "MASTER_ADDR": "127.0.0.1"}
    assert result["threads"] == 1 and result["pid"] != os.getpid()
    assert not dist.is_initialized()  # the caller stays outside any process group


def _rank_one_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one cannot go on")
    dist.all_reduce(torch.ones(1))  # waits for rank 1, which never comes


def test_a_worker_exception_is_raised_in_the_caller_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank one cannot go on") as info:
        launch(_rank_one_raises, 2, timeout=60)
    assert info.value.rank == 1
    assert "ValueError: rank one cannot go on" in info.value.traceback
    assert "_rank_one_raises" in info.value.traceback  # the worker's own frames
    assert time.monotonic() - start < 30  # rank 0 did not keep the caller waiting


def _sleeps(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_timeout_stops_every_rank():
    with pytest.raises(TimeoutError, match="did not finish within"):
        launch(_sleeps, 2, timeout=1)


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        launch(_sum_of_ranks, 0, 1.0)
