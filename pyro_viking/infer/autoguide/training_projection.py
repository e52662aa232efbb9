"""The projectors of an :class:`~pyro_viking.AutoViking`: the one of a model call (its data, at
the guide's ``loc``), and the alternating projections of fresh samples over the *training* data
that prediction draws from (``project_training_data``, or lazily when a prediction needs them).

A pass over the training data (``model_trace.inspection.training_batches``) visits its batches
in turn, ``k ← P_b k``; the samples ``(ε, k)`` are cached in the guide's
:class:`~pyro_viking.infer.autoguide.sampling.SamplingState`.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import pyro.poutine as poutine
import torch
from torch import Tensor

from pyro_viking.infer.autoguide.projector_choice import ProjectorBuilder
from pyro_viking.linalg import KernelProjector
from pyro_viking.model_trace import inspection

__all__ = ["call_projector", "plate_indices", "project_on_training_data",
           "refresh_prediction_samples"]


def plate_indices(plates: dict, frames: dict) -> Dict[str, Tensor]:
    """The subsample indices that the guide's ``plates`` of this call drew for the subsampled
    data plates ``frames`` (the model replays them: the projection's minibatch is the model's)."""
    idx = {n: getattr(plates.get(n), "_indices", None) for n in frames}
    return {name: i for name, i in idx.items() if i is not None}


def call_projector(guide, args: tuple, kwargs: dict, subsample: Optional[Dict[str, Tensor]],
                   differentiable: bool = False, training: bool = False) -> KernelProjector:
    """Projector onto the kernel of the Jacobian of ``guide``'s model on the data of
    ``model(*args, **kwargs)`` (``subsample``: indices of its subsampled data plates) at
    ``guide.loc``; ``P = I`` for a call without observations. Latents of other guides of an
    ``AutoGuideList`` are held at their medians (``inspection.other_latents``)."""
    if guide._raw_model is None:
        raise RuntimeError("this AutoViking was loaded without its model (saving drops it): "
                           "call guide.set_model(model) before training or projecting")
    call = guide._inspector(args, kwargs)
    if not call.has_observations:
        return ProjectorBuilder.identity(guide.latent_dim, guide.loc)
    condition = inspection.other_latents(guide, call, args, kwargs, subsample)
    return guide._builder.build(guide._inspector.model, guide.layout, args, kwargs, guide.loc,
                                subsample=subsample, condition=condition,
                                differentiable=differentiable, training=training)


def project_on_training_data(guide, args: tuple, kwargs: dict, batches: Optional[Iterable],
                             num_samples: int, num_passes: int, progress: bool, *,
                             lazy: bool) -> Tensor:
    """``num_passes`` passes of alternating projections of ``num_samples`` fresh samples over
    the training data (``batches``, else the model's subsampled data plate walked in order,
    else the one call); caches ``(ε, k)`` in the guide's sampling state and returns
    ``k`` ``(S, D)``. ``lazy``: projected by the guide itself for a prediction."""
    frames = {} if batches is not None else guide._inspector(args, kwargs).data_frames
    projectors = [lambda b=b: call_projector(guide, *b) for _ in range(num_passes)
                  for b in inspection.training_batches(args, kwargs, batches, frames)]
    return guide._state.project(projectors, num_samples, guide.loc.detach(), lazy=lazy,
                                progress=progress)


def refresh_prediction_samples(guide, n: int) -> None:
    """Project samples on the training data (when the guide knows it) if ``n`` prediction draws
    call for it (``SamplingState.needs_projection``); a model with several subsampled data
    plates has no order to walk them in: prediction then warns instead."""
    state, data = guide._state, guide._state.training_data
    if state.needs_projection(n) and data is not None and guide._raw_model is not None:
        with torch.enable_grad(), poutine.mask(mask=True):
            try:
                project_on_training_data(guide, *data, None, max(n, state.LAZY_NUM_SAMPLES), 1,
                                         False, lazy=True)
            except inspection.SeveralDataPlates:
                state.forget_training_data()
