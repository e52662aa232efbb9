"""The data plate of a Bayesian network's call ``bnn(x, y)``: which rows of ``x`` one call's
likelihood covers, and by how much it is scaled.

* ``num_data=N`` and a minibatch ``x`` of ``B ≤ N`` rows (a data loader's): all ``B`` rows, the
  likelihood scaled by ``N / B``;
* ``batch_size=B`` and all ``N`` training rows: a random minibatch of ``B`` (scaled ``N / B``);
* otherwise (and always for prediction, ``y=None``): every row, unscaled.
"""

from __future__ import annotations

from typing import Optional

import pyro
import torch
from torch import Tensor

__all__ = ["data_plate"]


def data_plate(x: Tensor, y: Optional[Tensor], num_data: Optional[int],
               batch_size: Optional[int]) -> pyro.plate:
    """The plate ``"data"`` (dim −1) of a call with inputs ``x`` ``(n, ...)`` and labels ``y``
    (``None``: prediction): its ``indices`` select the rows of ``x`` (a new random minibatch
    when it subsamples). ``ValueError`` for a minibatch larger than ``num_data``."""
    n = x.shape[0]
    if y is not None and num_data is not None and num_data != n:
        if n > num_data:
            raise ValueError(
                f"a minibatch of {n} rows with num_data={num_data}: num_data is the number of "
                f"training data N, of which each minibatch is a part, so it is at least the "
                f"batch size ({n}); build the BayesianNetwork with num_data=len(dataset) (e.g. "
                "len(loader.dataset))")
        return pyro.plate("data", num_data, subsample=torch.arange(n, device=x.device), dim=-1)
    size = batch_size if y is not None and batch_size is not None and batch_size < n else None
    return pyro.plate("data", n, subsample_size=size, dim=-1, device=x.device)
