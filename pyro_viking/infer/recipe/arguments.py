"""What a recipe call is given, checked before any step, and the state it starts from.

:func:`check_steps` and :func:`check_training_data` refuse what would give a wrong answer
later (negative step counts, a one-pass generator of batches, no data, a
:class:`~pyro_viking.BayesianNetwork` whose ``num_data`` disagrees with the data it is trained
on) with the value and the fix. :func:`reset_owned_params` deletes the param-store entries a fit
owns — its guides' (``AutoDelta.*``, ``AutoViking.*``) and the
:class:`~pyro_viking.BayesianNetwork`'s own (:attr:`~pyro_viking.BayesianNetwork.param_names`)
— so that a fit starts from its arguments, not from what an earlier fit (or an interrupted one)
left in Pyro's global param store.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import pyro
import torch

from pyro_viking.model_trace.inspection import batch_call
from pyro_viking.nn.bayesian_network import BayesianNetwork

__all__ = ["GUIDE_PREFIXES", "check_steps", "check_training_data", "reset_owned_params"]

#: param-store prefixes of the guides a recipe builds (Pyro names autoguide params
#: ``"<class name>.<param>"``)
GUIDE_PREFIXES = ("AutoDelta.", "AutoViking.")


def check_steps(**counts: Optional[int]) -> None:
    """Raise ``ValueError`` for a step count that is not a non-negative integer (``None``:
    the default, allowed)."""
    for name, value in counts.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def reset_owned_params(model: Callable) -> None:
    """Delete the param-store entries a recipe fit owns (module docstring). A model's other
    params (e.g. a ``prior_scale_param`` of a hand-written model) are the user's: kept."""
    store = pyro.get_param_store()
    owned = set(model.param_names) if isinstance(model, BayesianNetwork) else set()
    for name in list(store.keys()):
        if name in owned or name.startswith(GUIDE_PREFIXES):
            del store[name]


def _rows(value) -> Optional[int]:
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def _dataset_size(batches: Iterable) -> Optional[int]:
    dataset = getattr(batches, "dataset", None)  # a DataLoader
    try:
        return None if dataset is None else len(dataset)
    except TypeError:  # an iterable data set
        return None


def check_training_data(model: Callable, args: tuple, batches: Optional[Iterable]) -> None:
    """Refuse training data a fit would misread (module docstring). ``args``: the model's
    arguments, used when ``batches`` is ``None``."""
    if batches is not None:
        if iter(batches) is batches:
            raise TypeError(
                f"batches={type(batches).__name__} is an iterator: it is used up after one pass, "
                "and a fit passes over the data several times (warm-up, curvature, ELBO). Pass a "
                "re-iterable collection: a list (batches=list(...)) or a DataLoader.")
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("batches is empty: no data to fit")
    rows = [_rows(a) for a in args] if batches is None else []
    if any(r == 0 for r in rows):
        raise ValueError(f"no data: the model's arguments have 0 rows "
                         f"(shapes {[tuple(a.shape) for a in args if _rows(a) is not None]})")
    if isinstance(model, BayesianNetwork):
        _check_num_data(model, args, batches)


def _check_num_data(bnn: BayesianNetwork, args: tuple, batches: Optional[Iterable]) -> None:
    if batches is None:
        n = _rows(args[0]) if args else None
        if bnn.num_data is not None and n is not None and bnn.num_data != n:
            raise ValueError(
                f"BayesianNetwork(num_data={bnn.num_data}) but the fit trains on all {n} rows of "
                f"x at every step, so the likelihood would be scaled by {bnn.num_data}/{n}. Drop "
                "num_data (batch_size=B subsamples x itself), or pass the minibatches of a larger "
                "data set with batches=.")
        return
    size = _dataset_size(batches)
    from_batch = batch_call(next(iter(batches)))[0]
    rows = _rows(from_batch[0]) if from_batch else None
    if bnn.num_data is not None and rows is not None and rows > bnn.num_data:
        raise ValueError(f"BayesianNetwork(num_data={bnn.num_data}) is below a batch of {rows} "
                         f"rows: num_data is the size of the whole data set"
                         f"{f' ({size} rows)' if size is not None else ''}.")
    if bnn.num_data is None and bnn.batch_size is None:
        raise ValueError(
            "batches= with a BayesianNetwork that does not know the data set's size: each batch "
            "would be taken for the whole data set (its likelihood scaled too little). Pass "
            f"BayesianNetwork(..., num_data={size if size is not None else 'N'}).")
    if bnn.num_data is not None and size is not None and bnn.num_data != size:
        raise ValueError(f"BayesianNetwork(num_data={bnn.num_data}) but the batches come from "
                         f"a data set of {size} rows: pass num_data={size}.")
