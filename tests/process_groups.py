"""Process groups for the multi-process tests: W ranks meeting at a fresh file rendezvous, so
the suite's process groups never race one another for a TCP port."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

#: forked ranks start with the test process's imports (a fresh process pays seconds for torch's)
FORK_IF_AVAILABLE = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _exit_after(rank: int, entry: Callable, *args) -> None:
    """``entry(rank, *args)``, then, when it returned, leave the process at once: a spawned
    rank's interpreter teardown can abort in gloo's or DDP's native threads ("terminate called
    without an active exception", SIGABRT after the test passed). A forked rank leaves this way
    anyway (multiprocessing ends it with ``os._exit``); a failure still raises, and is reported."""
    entry(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(entry: Callable, world: int, *args, start_method: str = "spawn") -> None:
    """Run ``entry(rank, *args, store)`` in ``world`` processes and wait for them (a rank's
    failure is raised here); ``store`` is the path of a rendezvous file made for this call."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_exit_after, args=(entry, *args, os.path.join(folder, "store")),
                           nprocs=world, join=True, start_method=start_method)


def init_group(rank: int, world: int, store: str) -> None:
    """Join the gloo process group of ``world`` ranks meeting at the file ``store``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
