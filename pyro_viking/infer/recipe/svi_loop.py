"""One phase of the VIKING recipe as a plain SVI loop: the model's training calls (its own
arguments, or batches cycled as often as needed), the steps, and the history they leave."""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

from pyro.infer import SVI

from pyro_viking.model_trace.inspection import batch_call

__all__ = ["HISTORY_KEYS", "first_call", "new_history", "run_phase", "training_calls"]

#: what :func:`run_phase` records per step (``VikingFit.history``)
HISTORY_KEYS = ("phase", "loss", "image_scale", "kernel_scale", "prior_scale")


def new_history() -> Dict[str, list]:
    """An empty history: one list per key of :data:`HISTORY_KEYS`."""
    return {k: [] for k in HISTORY_KEYS}


def training_calls(args: tuple, kwargs: dict,
                   batches: Optional[Iterable]) -> Iterator[Tuple[tuple, dict]]:
    """Endless ``(args, kwargs)`` of the model's training calls: ``(args, kwargs)`` itself
    repeated, or the items of ``batches`` cycled (each read by
    :func:`~pyro_viking.model_trace.inspection.batch_call`)."""
    if batches is None:
        return itertools.repeat((args, kwargs))

    def cycle():
        while True:
            empty = True
            for item in batches:
                empty = False
                yield batch_call(item)
            if empty:
                raise ValueError("batches is empty")

    return cycle()


def first_call(args: tuple, kwargs: dict, batches: Optional[Iterable]) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` of the first training call (the first of ``batches`` if given)."""
    return batch_call(next(iter(batches))) if batches is not None else (args, kwargs)


def run_phase(svi: SVI, calls: Iterator, steps: int, phase: str, history: Dict[str, list],
              record: Callable[[], Tuple[float, float, float]], progress: bool) -> None:
    """``steps`` SVI steps on the next ``calls``; appends to ``history`` the phase name, the
    loss and ``record()``'s ``(image_scale, kernel_scale, prior_scale)`` of each step."""
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"VIKING {phase}", disable=not progress, leave=False)
    for _ in bar:
        a, kw = next(calls)
        loss = svi.step(*a, **kw)
        im, ker, prior = record()
        for key, value in zip(HISTORY_KEYS, (phase, loss, im, ker, prior)):
            history[key].append(value)
        if bar.n % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", sigma_im=f"{im:.3g}", sigma_ker=f"{ker:.3g}")
