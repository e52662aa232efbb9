"""Run a function in W processes with a ``torch.distributed`` process group, from a notebook or
a script, without ``torchrun``: :func:`launch` starts ranks ``0 … W − 1`` on this machine, each
calling ``fn(rank, world_size, *args)`` inside a process group on a free localhost port, and
returns rank 0's return value to the caller::

    from pyro_viking.infer import launch

    def train(rank, world_size, dataset, steps):
        ...                                   # distributed.py's recipe: shard_loader, ...
        return {"loss": loss, "state": elbo.state_dict()}   # rank 0's value comes back

    result = launch(train, 2, dataset, 100)   # two gloo ranks on this machine's CPUs

**Start method.** ``"fork"`` (the default on Linux with ``gloo``) runs a function defined in a
notebook cell (``"spawn"`` re-imports it by name in each process, which fails for a notebook's
``__main__``); CUDA cannot be used in a forked child of a process that has initialised it, so
``backend="nccl"``, or a parent that has used CUDA, gets ``"spawn"`` (``fn`` and ``args`` must
then be importable and picklable). Either way a rank ends with ``os._exit`` once ``fn`` has
returned and the process group is destroyed (a spawned rank's ``atexit`` handlers do not run): a
spawned interpreter's teardown can abort in gloo's or DDP's native threads after the work
succeeded.

**Errors.** A worker's exception is sent back as its traceback text: :func:`launch` ends the
other ranks (which may be waiting for the failed one inside a collective) and raises
:class:`WorkerError` carrying the rank and the traceback of the first worker that failed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

__all__ = ["WorkerError", "free_port", "launch"]

_GRACE_S = 2.0  # how long the other ranks may take to stop by themselves after a failure


class WorkerError(RuntimeError):
    """A rank of :func:`launch` raised (or died): ``rank``, and ``traceback`` (the worker's
    traceback text, or how the process ended when it raised no Python exception)."""

    def __init__(self, rank: int, traceback_text: str):
        self.rank, self.traceback = rank, traceback_text
        super().__init__(f"rank {rank} failed:\n{traceback_text}")

    def __reduce__(self):
        return type(self), (self.rank, self.traceback)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (the operating system's choice for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_start_method(backend: str) -> str:
    forkable = sys.platform.startswith("linux") and \
        "fork" in multiprocessing.get_all_start_methods()
    if backend == "nccl" or torch.cuda.is_initialized() or not forkable:
        return "spawn"
    return "fork"


def _worker(rank: int, world_size: int, fn: Callable, args: tuple, backend: str, port: int,
            num_threads: Optional[int], folder: str) -> None:
    """One rank: set up its environment and process group, run ``fn``, write rank 0's value
    (``result.pt``) or this rank's traceback (``error-<rank>.pkl``, with the time it failed)."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        value = fn(rank, world_size, *args)
        if dist.is_initialized():  # unless fn left it: every rank done before rank 0's store goes
            dist.barrier()
            dist.destroy_process_group()
        if rank == 0:
            torch.save(value, os.path.join(folder, "result.pt"))
    except BaseException:  # noqa: B036 - every way out of fn is reported, then the rank exits
        path = os.path.join(folder, f"error-{rank}.pkl")
        with open(path + ".part", "wb") as f:
            pickle.dump((time.time(), traceback.format_exc()), f)
        os.replace(path + ".part", path)  # whole, or absent
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # Done: leave at once, as a forked rank does anyway (multiprocessing ends it with os._exit).
    # A spawned rank's interpreter teardown can abort in gloo's or DDP's native threads
    # ("terminate called without an active exception") after its work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _first_error(folder: str, processes: List[Any], failed: int) -> WorkerError:
    """The error of the rank that failed first (by the time in its error file), else of the
    rank ``failed`` whose exit was seen first (a crash or a signal: no error file)."""
    reports = []
    for rank in range(len(processes)):
        path = os.path.join(folder, f"error-{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                when, text = pickle.load(f)
            reports.append((when, rank, text))
    if reports:
        _, rank, text = min(reports)
        return WorkerError(rank, text)
    code = processes[failed].exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return WorkerError(failed, f"the process ended with {how} without a Python exception "
                               "(killed, out of memory, or a crash in native code)")


def _stop(processes: List[Any], grace_s: float) -> None:
    """Wait up to ``grace_s`` for the started processes, then terminate, then kill those left."""
    processes = [p for p in processes if p.pid is not None]
    end = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
           start_method: Optional[str] = None, num_threads: Optional[int] = None,
           timeout: Optional[float] = None) -> Any:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes, rank ``r`` in a
    process group (``backend``: ``"gloo"`` for CPU tensors, ``"nccl"`` for one GPU per rank,
    rank ``r`` on ``cuda:r``) on a free port of 127.0.0.1, and return rank 0's return value
    (saved by ``torch.save`` and loaded here on the CPU: a tensor comes back as a CPU tensor).

    :param start_method: ``"fork"`` or ``"spawn"`` (default: the module docstring's rule).
    :param num_threads: ``torch.set_num_threads`` in each rank (default: left as the process
        starts: the parent's count under fork, torch's default under spawn).
    :param timeout: seconds before every rank is stopped and ``TimeoutError`` raised (default:
        no limit).

    Each rank finds ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    set as ``torchrun`` sets them. Raises :class:`WorkerError` when a rank raises or dies (the
    others are stopped), ``ValueError`` for ``world_size < 1``."""
    if int(world_size) < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    world_size = int(world_size)
    context = multiprocessing.get_context(start_method or _default_start_method(backend))
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="pyro-viking-launch-") as folder:
        port = free_port()
        processes = [context.Process(target=_worker, name=f"pyro-viking-rank-{rank}",
                                     args=(rank, world_size, fn, args, backend, port,
                                           num_threads, folder))
                     for rank in range(world_size)]
        try:
            for p in processes:
                p.start()
            running = {p.sentinel: rank for rank, p in enumerate(processes)}
            while running:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = multiprocessing.connection.wait(list(running), timeout=wait)
                if not ready:
                    _stop(processes, 0.0)
                    raise TimeoutError(f"launch: the {world_size} ranks did not finish within "
                                       f"{timeout} s")
                for sentinel in ready:
                    rank = running.pop(sentinel)
                    processes[rank].join()
                    if processes[rank].exitcode != 0:
                        _stop(processes, _GRACE_S)
                        raise _first_error(folder, processes, rank)
        finally:
            _stop(processes, 0.0)  # nothing left running, however this ends (^C included)
        return torch.load(os.path.join(folder, "result.pt"), map_location="cpu",
                          weights_only=False)
