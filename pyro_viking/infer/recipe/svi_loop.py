"""One phase of the VIKING recipe as a plain loop of training steps (``SVI``, or the ELBO module
of :mod:`~pyro_viking.infer.recipe.engine`): the model's training calls (its own arguments, or
batches cycled as often as needed), the steps, and the history they leave."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

from pyro.infer import SVI

from pyro_viking.infer.recipe.engine import ModuleStepper
from pyro_viking.model_trace.inspection import batch_call

__all__ = ["COLLAPSE_FRACTION", "DIVERGENCE_WINDOW", "HISTORY_KEYS", "check_divergence",
           "first_call", "new_history", "run_phase", "training_calls"]

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


def run_phase(svi: Union[SVI, ModuleStepper], calls: Iterator, steps: int, phase: str,
              history: Dict[str, list], record: Callable[[], Tuple[float, float, float]],
              progress: bool, image_scale: float = math.nan) -> None:
    """``steps`` training steps (``svi.step``: ``SVI`` or a
    :class:`~pyro_viking.infer.recipe.engine.ModuleStepper`) on the next ``calls``; appends to
    ``history`` the phase name, the loss and ``record()``'s ``(image_scale, kernel_scale,
    prior_scale)`` of each step, and stops a diverged phase (:func:`check_divergence`;
    ``image_scale``: σ_im before the first step). A ``ModuleStepper`` hands its optimiser
    state to the Pyro optimiser at the end (``sync``)."""
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"VIKING {phase}", disable=not progress, leave=False)
    start = len(history["loss"])
    for _ in bar:
        a, kw = next(calls)
        loss = svi.step(*a, **kw)
        im, ker, prior = record()
        for key, value in zip(HISTORY_KEYS, (phase, loss, im, ker, prior)):
            history[key].append(value)
        check_divergence(history, start, svi.optim, image_scale)
        if bar.n % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", sigma_im=f"{im:.3g}", sigma_ker=f"{ker:.3g}")
    if isinstance(svi, ModuleStepper):  # the Pyro optimiser holds the state, as after SVI
        svi.sync()


#: σ_im falling below this fraction of its value at the start of a phase, while the loss grows,
#: is a diverged fit (the optimiser overshoots and the posterior collapses onto θ̂)
COLLAPSE_FRACTION = 1e-6
#: steps averaged at each end of the phase when comparing losses
DIVERGENCE_WINDOW = 10


def check_divergence(history: Dict[str, list], start: int, optim, image_scale: float) -> None:
    """Raise ``RuntimeError`` when the phase that began at step ``start`` diverged: a
    non-finite loss, or σ_im fallen below :data:`COLLAPSE_FRACTION` of ``image_scale`` (its
    value before the phase) while the mean loss of the last :data:`DIVERGENCE_WINDOW` steps
    exceeds the phase's first loss. The message names the optimiser's learning rate."""
    loss, image = history["loss"][start:], history["image_scale"][start:]
    lr = getattr(optim, "pt_optim_args", {})
    lr = lr.get("lr") if isinstance(lr, dict) else None
    fix = (f"lower the learning rate (lr={lr})" if lr is not None else
           "lower the learning rate") + " or clip the gradients (pyro.optim.ClippedAdam)"
    if not math.isfinite(loss[-1]):
        raise RuntimeError(f"training diverged: the loss is {loss[-1]} at step {len(loss)} of "
                           f"the {history['phase'][-1]} phase; {fix}.")
    w = DIVERGENCE_WINDOW
    if len(loss) < w or not (math.isfinite(image_scale) and image_scale > 0):
        return
    last = sum(loss[-w:]) / w
    if image[-1] < COLLAPSE_FRACTION * image_scale and last > loss[0]:
        raise RuntimeError(
            f"training diverged: over {len(loss)} steps of the {history['phase'][-1]} phase the "
            f"loss grew from {loss[0]:.4g} to {last:.4g} (mean of the last {w}) while σ_im "
            f"collapsed from {image_scale:.3g} to {image[-1]:.3g} (a posterior of zero width); "
            f"{fix}.")
