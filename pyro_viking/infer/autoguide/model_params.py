"""The model's own ``pyro.param`` entries that a saved :class:`~pyro_viking.AutoViking` carries.

A guide predicts with the model, whose learned parameters (a regression noise scale, the prior
scale ``σ_ker`` is tied to, point-estimated layers) live in Pyro's global param store, not on
the guide. A pickled guide keeps a snapshot of those the model reads (the ``param`` sites of
the calls its inspector traced: constrained value and constraint); loaded into a process whose
store lacks them, its first use puts them back, leaving every entry the store has untouched."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import pyro
from torch import Tensor
from torch.distributions.constraints import Constraint

__all__ = ["params_to_save", "restore_missing", "restore_once", "snapshot"]

#: param name -> (constrained value, constraint)
Snapshot = Dict[str, Tuple[Tensor, Constraint]]


def snapshot(names: Iterable[str]) -> Snapshot:
    """The param store's current entries among ``names`` (detached copies)."""
    store = pyro.get_param_store()
    names = [name for name in sorted(set(names)) if name in store]
    if not names:
        return {}
    constraints = store.get_state()["constraints"]
    return {name: (store[name].detach().clone(), constraints[name]) for name in names}


def restore_missing(saved: Snapshot) -> None:
    """Put the entries of ``saved`` that the param store lacks into it."""
    store = pyro.get_param_store()
    for name, (value, constraint) in saved.items():
        if name not in store:
            store.setdefault(name, value.clone(), constraint)


def params_to_save(guide) -> Snapshot:
    """What a pickled ``guide`` carries: the param store's entries of the model's ``pyro.param``
    sites its inspector saw, over the snapshot it was loaded with (if not restored yet)."""
    names = () if guide._inspector is None else guide._inspector.params
    return {**guide.__dict__.get("_saved_model_params", {}), **snapshot(names)}


def restore_once(guide) -> None:
    """On the first use of a guide loaded from a pickle: :func:`restore_missing` its snapshot."""
    saved = guide.__dict__.pop("_saved_model_params", None)
    if saved:
        restore_missing(saved)
