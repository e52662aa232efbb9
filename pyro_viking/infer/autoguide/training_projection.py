"""The projectors of an :class:`~pyro_viking.AutoViking`: the one of a model call (its data, at
the guide's ``loc``), and the alternating projections of fresh samples over the *training* data
that prediction draws from (``project_training_data``, or lazily when a prediction needs them).

A pass over the training data (``model_trace.inspection.training_batches``) visits its batches
in turn, ``k ← P_b k``; the samples ``(ε, k)`` are cached in the guide's
:class:`~pyro_viking.infer.autoguide.sampling.SamplingState`. With ``distributed=True`` (inside a
``torch.distributed`` process group, each rank holding a shard of the training data) the samples
get one exact projection onto the kernel of the union of every rank's rows instead
(:func:`project_sharded`, :mod:`pyro_viking.linalg.distributed_projection`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import pyro.poutine as poutine
import torch
from torch import Tensor

from pyro_viking.infer.autoguide.projector_choice import ProjectorBuilder
from pyro_viking.linalg import KernelProjector
from pyro_viking.linalg.distributed_projection import (
    broadcast_from,
    check_replicated,
    raise_together,
    sharded_projector,
    stack_rows,
    world,
)
from pyro_viking.model_trace import inspection

__all__ = ["call_projector", "plate_indices", "project_on_training_data", "project_sharded",
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
                             lazy: bool, distributed: bool = False) -> Tensor:
    """``num_passes`` passes of alternating projections of ``num_samples`` fresh samples over
    the training data (``batches``, else the model's subsampled data plate walked in order,
    else the one call); caches ``(ε, k)`` in the guide's sampling state and returns
    ``k`` ``(S, D)``. ``lazy``: projected by the guide itself for a prediction.
    ``distributed``: these data are this rank's shard, :func:`project_sharded`."""
    frames = {} if batches is not None else guide._inspector(args, kwargs).data_frames
    if distributed:
        if num_passes != 1:
            raise ValueError("distributed=True projects exactly, in one solve over every "
                             f"rank's rows: num_passes must be 1, got {num_passes}")
        return project_sharded(guide, list(inspection.training_batches(args, kwargs, batches,
                                                                      frames)), num_samples)
    projectors = [lambda b=b: call_projector(guide, *b) for _ in range(num_passes)
                  for b in inspection.training_batches(args, kwargs, batches, frames)]
    return guide._state.project(projectors, num_samples, guide.loc.detach(), lazy=lazy,
                                progress=progress)


def project_sharded(guide, batches: List[tuple], num_samples: int, group=None) -> Tensor:
    """Project ``num_samples`` samples onto the kernel of the Jacobian of *every* rank's training
    rows at ``guide.loc``, exactly (one solve, no alternating passes): this rank's rows are those
    of its ``batches`` (``(args, kwargs, subsample)``), stacked; the ranks' rows together are
    the union (:func:`~pyro_viking.linalg.distributed_projection.sharded_projector`, with the
    guide's solver and solver options). Collective: every rank calls it, with the same ``loc``
    and ``num_samples`` (``ValueError`` on every rank otherwise). Every rank draws ε (so their
    random streams advance alike) and takes rank 0's: the samples ``(ε, k)``, cached for
    prediction and returned (``k``, ``(S, D)``), are the same on every rank; prediction never
    re-projects them lazily (a rank alone would project on its shard only): once trained further,
    it warns that they are stale. Outside a process group: the exact projection on this
    process's rows."""
    loc = guide.loc.detach()
    check_replicated(loc.new_tensor([num_samples]), "num_samples", group)
    check_replicated(loc, "the guide's loc (θ̂)", group)
    e = broadcast_from(torch.randn(num_samples, loc.shape[-1], dtype=loc.dtype,
                                   device=loc.device), 0, group)
    builder, error, local = guide._builder, None, None
    with torch.no_grad():
        try:  # a failure on one rank (e.g. a non-finite Jacobian) must not leave the others waiting
            local = stack_rows([call_projector(guide, *batch).operator for batch in batches])
        except Exception as exc:  # noqa: BLE001 - re-raised by raise_together
            error = exc
        raise_together(error, "building this rank's Jacobian", group, loc.device)
        k = sharded_projector(local, group=group, solver=builder.solver,
                              **builder.solver_options)(e)
    guide._state.set_prediction_samples(e, k, lazy=False, sharded=world(group)[1] > 1)
    return k


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
