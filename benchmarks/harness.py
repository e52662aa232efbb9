"""The measuring harness of ``bench_step.py`` and ``bench_step_memory.py``: a device
synchronisation, interleaved timing of step functions, and the plain-text tables they print."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch


def device_sync(device: str) -> Callable[[], None]:
    """What waits for ``device``'s queue: ``torch.cuda.synchronize`` on CUDA, else nothing."""
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(steppers: Dict[str, Callable[[], object]], *, repeats: int,
                     target_s: float, sync: Callable[[], None],
                     max_steps: int = 50) -> Tuple[Dict[str, float], Dict[str, int]]:
    """Median seconds per call of each stepper over ``repeats`` interleaved rounds (the order
    rotates each round), each round timing ``counts[name]`` consecutive calls (about
    ``target_s`` seconds, at most ``max_steps``). Returns (medians, counts)."""
    counts = {}
    for name, f in steppers.items():
        f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        dt = time.perf_counter() - t0
        counts[name] = max(1, min(max_steps, round(target_s / max(dt, 1e-6))))
    times: Dict[str, List[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            f, n = steppers[name], counts[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync()
            times[name].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}, counts


def print_table(title: str, header: List[str], rows: List[List[str]]) -> None:
    """Print a markdown table with padded columns under ``title``."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    print(f"\n{title}\n")
    print(fmt(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt(r))
    sys.stdout.flush()


def format_ratio(v: float) -> str:
    """A ratio as ``1.23x`` (``123x`` from 100 on)."""
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"
