"""What a guide needs to know about one model call, from one blocked trace per call signature.

:func:`inspect_model` traces the model once (blocked, RNG state restored) and returns a
:class:`ModelCall`: the subsampled data plates, whether there is a likelihood, and the continuous
latents that the guide's layout does not cover (those of other guides of an ``AutoGuideList``).
It raises clear errors for what a VIKING guide cannot handle: changed latent shapes, invalid
observations, discrete latents hidden from the guide (enumerated), local latents of a subsampled
plate. :func:`strip_blocks` removes the ``poutine.block`` wrappers that hide the other guides'
latents, so that the Jacobian can be taken at their values instead of at prior draws;
:func:`check_list_latents_visible` refuses a block it cannot strip (hidden inside a lambda).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import pyro.poutine as poutine
import torch
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import (
    check_observed_site,
    observed_data_frames,
    observed_sites,
    trace_model,
)
from pyro_viking.model_trace.subsampling import subsampled_frames
from pyro_viking.user_warnings import warn

__all__ = ["ModelCall", "ModelInspector", "SeveralDataPlates", "batch_call",
           "check_list_latents_visible", "check_no_subsampled_latents", "check_not_jit_traced",
           "inspect_model", "other_latents", "shape_signature", "strip_blocks",
           "training_batches"]


@dataclass
class ModelCall:
    """Facts about one model call signature (see :func:`inspect_model`)."""

    data_frames: dict[str, CondIndepStackFrame] = field(default_factory=dict)
    has_observations: bool = True
    #: latents outside the layout -> ``(dim, plate name)`` of their subsampled plates, ``dim``
    #: counted from the right of the site's *value* (event dims included), as ``index_select``
    #: takes it
    extra_latents: dict[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)
    #: names of every sample site of the call (observed or not)
    sites: frozenset = frozenset()
    #: whether the latents of a guide list's model were checked to be visible to this call
    list_checked: bool = False
    #: names of the ``pyro.param`` sites the model reads in this call
    params: frozenset = frozenset()
    #: whether the latents that no part of the guide list has a median of were warned about
    warned_no_median: bool = False


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
    kept, in order), also inside a ``functools.partial`` (re-bound to the same arguments).
    Blocks inside the model's code, or inside any other callable (a lambda), are untouched."""
    layers, fn = [], model
    while isinstance(fn, partial) and len(fn.args) >= 2 and isinstance(fn.args[0], Messenger):
        layers.append(fn.args[0])
        fn = fn.args[1]
    if type(fn) is partial:  # a user's partial (a handler's is a subclass of partial)
        fn = partial(strip_blocks(fn.func), *fn.args, **fn.keywords)
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
    params = frozenset(n for n, s in trace.nodes.items() if s["type"] == "param")
    if not training:
        return ModelCall(params=params)
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
                "discrete latents (enumerated or not): write the model with the site summed out "
                "by hand.")
        event_dim = site["fn"].event_dim  # a plate's dim counts batch dims only
        extra[name] = tuple((f.dim - event_dim, f.name) for f in subsampled_frames(site))
    sites = frozenset(n for n, s in trace.nodes.items() if s["type"] == "sample")
    return ModelCall(observed_data_frames(trace), bool(observed), extra, sites, params=params)


def check_not_jit_traced() -> None:
    """Raise a clear error under ``torch.jit.trace`` (e.g. ``JitTrace_ELBO``)."""
    if torch._C._get_tracing_state():
        raise NotImplementedError("AutoViking cannot be JIT-traced (JitTrace_ELBO): its "
                                  "projection runs Python control flow; use TraceViking_ELBO or "
                                  "Trace_ELBO")


def check_no_subsampled_latents(prototype_trace, names) -> None:
    """Raise if a latent lies in a subsampled plate (one value per minibatch slot would be
    reused for every minibatch)."""
    for name in names:
        frames = subsampled_frames(prototype_trace.nodes[name])
        if frames:
            raise ValueError(
                f"latent '{name}' lies in the subsampled plate '{frames[0].name}' (a local "
                "latent); AutoViking keeps one value per coordinate and cannot follow the "
                "minibatches. Guide local latents with another guide: "
                f"AutoGuideList with AutoViking(poutine.block(model, hide=['{name}'])) and "
                f"AutoNormal(poutine.block(model, expose=['{name}'])).")


class SeveralDataPlates(ValueError):
    """The model subsamples several data plates: no single order walks its training data."""


def batch_call(item) -> tuple[tuple, dict]:
    """One batch as ``(args, kwargs)``: an argument tuple/list (or a single argument), a kwargs
    dict, or an ``(args, kwargs)`` pair."""
    if isinstance(item, dict):
        return (), item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) \
            and isinstance(item[1], dict):
        return item
    return (tuple(item) if isinstance(item, (tuple, list)) else (item,)), {}


def training_batches(args: tuple, kwargs: dict, batches: Optional[Iterable],
                     frames: dict[str, CondIndepStackFrame], device=None) -> Iterator[tuple]:
    """``(args, kwargs, subsample)`` of each batch of a pass over the training data: the items
    of ``batches`` (argument tuples, ``(args, kwargs)`` pairs or kwargs dicts), else the model's
    subsampled data plate walked in order in chunks of its subsample size (the last chunk
    wrapping around: repeated data only repeat rows of J), else the one call ``args, kwargs``."""
    if batches is not None:
        for item in batches:
            yield (*batch_call(item), {})
        return
    if len(frames) > 1:
        raise SeveralDataPlates(f"the model subsamples several data plates {sorted(frames)}; "
                                "pass batches=[...] explicitly")
    if not frames:
        yield args, kwargs, {}
    for name, frame in frames.items():
        for start in range(0, frame.full_size, frame.size):
            idx = torch.arange(start, start + frame.size, device=device)
            yield args, kwargs, {name: idx % frame.full_size}


def check_list_latents_visible(list_model: Optional[Callable], call: ModelCall, args: tuple,
                               kwargs: dict) -> None:
    """Raise when latents of the guide list's model ``list_model`` are not sample sites of the
    AutoViking part's call ``call``: a ``poutine.block`` hidden inside a callable (a lambda) was
    not stripped, so the Jacobian would draw them from their priors, out of reach of the other
    parts' medians."""
    if list_model is None or not call.sites:
        return
    with torch.random.fork_rng(devices=[]):
        trace = trace_model(list_model, args, kwargs, {})
    hidden = sorted(n for n, _ in trace.iter_stochastic_nodes() if n not in call.sites)
    if hidden:
        raise ValueError(
            f"the latents {hidden} of the AutoGuideList's model are hidden from its AutoViking "
            "part inside a callable (e.g. a lambda around poutine.block), so its Jacobian would "
            "draw them from their priors instead of taking the other parts' medians. Pass "
            f"AutoViking(poutine.block(model, hide={hidden})) itself, not wrapped in a lambda.")


def other_latents(guide, call: ModelCall, args: tuple, kwargs: dict,
                  subsample: dict) -> Optional[dict]:
    """Values for the latents outside ``guide``'s layout, at which its Jacobian is taken: the
    medians of the other parts of its ``AutoGuideList`` (parts not yet set up, which run after
    ``guide``, are set up first), restricted to this call's subsample. A part's ``median`` sees
    the call's arguments, so an amortised part returns e.g. its encoder's mean for the data,
    one per datum, of which the minibatch's are taken. Latents without a median (no
    ``AutoGuideList``, or a part without one, such as a plain callable that Pyro wraps in an
    ``AutoCallable``) stay prior draws, with a warning."""
    if guide.master is not None and not call.list_checked:
        list_model = (guide.master()._model or (None,))[0]  # None once loaded from a pickle
        check_list_latents_visible(list_model, call, args, kwargs)
        call.list_checked = True
    if not call.extra_latents:
        return None
    if guide.master is None:
        warn(f"latents {sorted(call.extra_latents)} are hidden from AutoViking: its Jacobian "
             "uses prior draws of them (guide them in an AutoGuideList to use their medians)")
        return None
    median = {}
    with poutine.block():  # AutoDelta.median runs its guide
        for part in guide.master():
            if part is not guide:
                if part.prototype_trace is None:
                    part._setup_prototype(*args, **kwargs)
                median.update(part.median(*args, **kwargs))
    values = {}
    for name, frames in call.extra_latents.items():
        if name in median:
            value = median[name]
            for dim, plate in frames:
                value = value.index_select(dim, subsample[plate])
            values[name] = value
    missing = sorted(set(call.extra_latents) - set(values))
    if missing and not call.warned_no_median:
        call.warned_no_median = True
        warn(f"no part of the AutoGuideList has a median of the latents {missing} (a plain "
             "callable part is wrapped in an AutoCallable, whose median is empty): AutoViking's "
             "Jacobian uses prior draws of them. Give their part a median, e.g. "
             "AutoCallable(model, guide, median) or an AutoGuide subclass with "
             "median(*args, **kwargs) (for local latents: one value per datum of the data).")
    return values


class ModelInspector:
    """:func:`inspect_model` once per call signature (and mode) of one model: holds the model
    the guide takes Jacobians of (outer blocks stripped) and the facts of each signature."""

    def __init__(self, model: Optional[Callable], layout: LatentLayout):
        self.layout, self.calls, self.warned_no_observations = layout, {}, False
        self.set_model(model)

    def set_model(self, model: Optional[Callable]) -> None:
        self.model = None if model is None else strip_blocks(model)

    def __call__(self, args: tuple, kwargs: dict, training: bool = True) -> ModelCall:
        """The facts of this call (no checks, defaults, when no model is attached)."""
        key = (shape_signature(args, kwargs), training)
        if key not in self.calls and self.model is not None:
            call = inspect_model(self.model, args, kwargs, self.layout, training=training)
            if training and not call.has_observations and not self.warned_no_observations:
                self.warned_no_observations = True
                warn("the model has no observed sites: without a likelihood the kernel is the "
                     "whole space and q = N(loc, σ_ker² I)")
            self.calls[key] = call
        return self.calls.get(key, ModelCall())

    @property
    def params(self) -> frozenset:
        """Names of the ``pyro.param`` sites the model read in the calls inspected so far."""
        return frozenset().union(*(call.params for call in self.calls.values()))

    def __getstate__(self):
        return {**self.__dict__, "model": None}
