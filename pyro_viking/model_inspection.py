"""What a guide needs to know about one model call, from one blocked trace per call signature.

:func:`inspect_model` traces the model once (blocked, RNG state restored) and returns a
:class:`ModelCall`: the subsampled data plates, whether there is a likelihood, and the continuous
latents that the guide's layout does not cover (those of other guides of an ``AutoGuideList``).
It raises clear errors for what a VIKING guide cannot handle: changed latent shapes, invalid
observations, discrete latents hidden from the guide (enumerated), local latents of a subsampled
plate. :func:`strip_blocks` removes the ``poutine.block`` wrappers that hide the other guides'
latents, so that the Jacobian can be taken at their values instead of at prior draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .model_likelihood import (
    LatentLayout,
    check_observed_site,
    observed_data_frames,
    observed_sites,
    trace_model,
)

__all__ = ["ModelCall", "inspect_model", "shape_signature", "strip_blocks",
           "check_no_subsampled_latents"]


@dataclass
class ModelCall:
    """Facts about one model call signature (see :func:`inspect_model`)."""

    data_frames: dict[str, CondIndepStackFrame] = field(default_factory=dict)
    has_observations: bool = True
    #: latents outside the layout -> ``(dim, plate name)`` of their subsampled plates
    extra_latents: dict[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)


def shape_signature(args: tuple, kwargs: dict) -> tuple:
    """Hashable summary of call arguments: tensor shapes, plain scalar values, type names."""

    def sig(v):
        if torch.is_tensor(v):
            return tuple(v.shape)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return type(v).__name__

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


def strip_blocks(model: Callable) -> Callable:
    """``model`` without the ``poutine.block`` handlers wrapped around it (other handlers are
    kept, in order). Blocks inside the model's code are untouched."""
    layers, fn = [], model
    while isinstance(fn, partial) and len(fn.args) >= 2 and isinstance(fn.args[0], Messenger):
        layers.append(fn.args[0])
        fn = fn.args[1]
    for messenger in reversed(layers):
        if not isinstance(messenger, BlockMessenger):
            fn = messenger(fn)
    return fn


def inspect_model(model: Callable, args: tuple, kwargs: dict, layout: LatentLayout, *,
                  training: bool) -> ModelCall:
    """Trace ``model(*args, **kwargs)`` once and check it against ``layout``.

    Always: the layout's latents keep their shapes. ``training``: observed values are finite and
    in their supports; latents outside the layout must be continuous (a discrete latent
    hidden from the guide, e.g. one enumerated by ``TraceEnum_ELBO``, would enter the Jacobian
    as a random draw).
    """
    with torch.random.fork_rng(devices=[]):
        trace = trace_model(model, args, kwargs, {}, validate=True if training else None)
    layout.check_shapes(trace, allow_extra=True)
    if not training:
        return ModelCall()
    observed = observed_sites(trace)
    for site in observed:
        check_observed_site(site)
    extra = {}
    for name, site in trace.iter_stochastic_nodes():
        if site_is_subsample(site) or name in layout.names:
            continue
        if site["fn"].support.is_discrete or site["infer"].get("enumerate"):
            raise ValueError(
                f"the model's discrete latent '{name}' is hidden from AutoViking; the Jacobian "
                "would use a random draw of it at each step. AutoViking cannot marginalise "
                "discrete latents: write the model with the site summed out by hand.")
        extra[name] = tuple((f.dim, f.name) for f in site["cond_indep_stack"]
                            if f.vectorized and f.full_size is not None and f.size < f.full_size)
    return ModelCall(observed_data_frames(trace), bool(observed), extra)


def check_no_subsampled_latents(prototype_trace, names) -> None:
    """Raise if a latent lies in a subsampled plate (one value per minibatch slot would be
    reused for every minibatch)."""
    for name in names:
        for frame in prototype_trace.nodes[name]["cond_indep_stack"]:
            if frame.vectorized and frame.full_size is not None and frame.size < frame.full_size:
                raise ValueError(
                    f"latent '{name}' lies in the subsampled plate '{frame.name}' (a local "
                    "latent); AutoViking keeps one value per coordinate and cannot follow the "
                    "minibatches. Guide local latents with another guide: "
                    f"AutoGuideList with AutoViking(poutine.block(model, hide=['{name}'])) and "
                    f"AutoNormal(poutine.block(model, expose=['{name}'])).")
