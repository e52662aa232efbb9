"""Bridge between a Pyro model and the numerical core: per-datum rows of a model as a function of
the flat unconstrained latent vector ``z`` (:class:`~pyro_viking.model_trace.layout.LatentLayout`).

Rows (:func:`make_rows_fn`)
    ``f(z)`` conditions the model on the latents unpacked from ``z`` and returns a vector
    ``(B,)`` that concatenates, in trace order, the rows of every *observed* site (``is_observed``
    and not a plate subsample site; latents conditioned by ``f`` itself are not observed sites).
    Observed sites that carry no data give no rows: a site whose mask is the constant ``False``
    (``poutine.reparam`` records a rewritten site so) and a global penalty (a ``pyro.factor``
    under no plate with a scalar log-factor: a term of the prior, not a datum):

    * ``jacobian="loss"``: ``site["fn"].log_prob(site["value"])`` (event dims already summed),
      zeroed where the site mask is ``False``, **not** multiplied by any scale (no ``N/B`` plate
      factor), then summed over every batch dim that is not the dim of a vectorised plate in the
      site's ``cond_indep_stack`` and flattened over the plate dims (leftmost plate slowest).
      A site gives ``prod(plate sizes)`` rows. A site under no plate gives one row per element
      of the dims its ``Independent`` wrappers (``.to_event``) reinterpret, as a plate would
      (their base factorises over elements), and warns when it gives one row for several
      values. The Jacobian of ``f`` is then the per-datum gradient of the log-likelihood.
    * ``jacobian="output"``: the natural output parameter of the (unwrapped ``Independent`` /
      ``MaskedDistribution`` / ``ExpandedDistribution``) distribution: ``logits`` if present
      (for ``Categorical`` these are the normalised logits), else ``loc``, else ``mean``;
      broadcast to the site's full shape, plate dims moved first and flattened, everything else
      (non-plate batch dims, reinterpreted dims, parameter dims) flattened after, so a site gives
      ``prod(plate sizes) * n_outputs`` rows (datum-major). Masked-out data give zero rows.
    * ``jacobian="fisher"``: the output rows whitened by the likelihood's Fisher information
      ``Λ`` w.r.t. that output, ``S(z)`` held constant (gradient stopped): rows ``S · output``
      with ``SᵀS = Λ``, so the rows' Jacobian is ``S J_f`` and its kernel is that of the GGN
      ``J_fᵀ Λ J_f`` (the Fisher-Rao metric of the paper) — :func:`_fisher_whitened`. Shapes
      and masks as for ``"output"``. Categorical, Bernoulli and Normal only.

    ``f`` runs the model inside ``poutine.block()`` (nothing reaches the caller's handlers: SVI
    traces, ``poutine.mask``, particle plates, ...) with a private plate-dim allocator, so the
    model's plates get the same dims as when it was set up, whatever plates enclose the caller.
    ``f`` composes with ``torch.func.jvp``/``vjp``/``jacrev``/``vmap`` and with autograd
    (including double backward). Inside a ``torch.func`` transform Pyro/torch validation is
    switched off (invalid values would otherwise surface as obscure ``vmap`` ``.item()``
    errors); validate outside transforms instead, with :func:`check_observed_site` on each
    observed site (as :func:`~pyro_viking.model_trace.inspection.inspect_model` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Unit
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import _DIM_ALLOCATOR
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, Normal

from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.subsampling import draws_random_indices, subsampled_frames
from pyro_viking.user_warnings import warn

__all__ = ["JACOBIANS", "check_observed_site", "make_rows_fn", "observed_data_frames",
           "observed_sites", "trace_model"]

#: the kinds of rows (module docstring): per-datum log-likelihoods, network outputs, or outputs
#: whitened by the likelihood's Fisher information
JACOBIANS = ("loss", "output", "fisher")


@contextmanager
def _private_plate_dims():
    """Give the inner model a fresh plate-dim allocator (the caller's plates are blocked)."""
    saved = _DIM_ALLOCATOR._stack
    _DIM_ALLOCATOR._stack = []
    try:
        yield
    finally:
        _DIM_ALLOCATOR._stack = saved


def _in_functorch_transform() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def trace_model(model, args, kwargs, data: dict, validate: bool | None = None):
    """Trace ``model`` conditioned on ``data``, invisible to the caller's handlers."""
    scope = nullcontext() if validate is None else pyro.validation_enabled(validate)
    with _private_plate_dims(), poutine.block(), scope:
        return poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)


def observed_sites(trace, latent_names=()):
    """Observed sample sites of ``trace`` that carry data: not subsample sites,
    ``pyro.deterministic`` records, the names in ``latent_names``, sites masked out entirely
    (:func:`_masked_out`) or global penalties (:func:`_is_global_factor`)."""
    return [
        site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)  # pyro.deterministic records
        and name not in latent_names
        and not _masked_out(site)
        and not _is_global_factor(site)
    ]


def _unwrapped(fn):
    """``fn`` and the distributions it wraps (``Independent``, masked, expanded), outer first."""
    chain = [fn]
    while isinstance(chain[-1], (Independent, MaskedDistribution, ExpandedDistribution)):
        chain.append(chain[-1].base_dist)
    return chain


def _masked_out(site) -> bool:
    """The site's mask is the constant ``False``: it adds nothing to the log-density. This is
    how ``poutine.reparam`` records a rewritten site (an observed ``Delta(...).mask(False)``)."""
    return site["mask"] is False or any(
        isinstance(d, MaskedDistribution) and d._mask is False for d in _unwrapped(site["fn"]))


def _is_global_factor(site) -> bool:
    """A ``pyro.factor`` (an observed ``Unit``) under no plate with one scalar log-factor: a
    penalty on the latents (part of the prior), not a datum."""
    return (not site["cond_indep_stack"] and isinstance(_unwrapped(site["fn"])[-1], Unit)
            and site["fn"].batch_shape.numel() == 1)


def _plates(site) -> dict[int, int]:
    return {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}


def _plates_first(t: Tensor, plates: dict[int, int], n_event: int) -> Tensor:
    """``t (*batch, *event)`` -> ``(prod(plate sizes), rest)`` with plate dims first."""
    n = max([t.dim() - n_event] + [-d for d in plates])
    t = t.reshape((1,) * (n - t.dim() + n_event) + t.shape)
    shape = [plates.get(i - n, size) for i, size in enumerate(t.shape[:n])]
    t = t.expand(shape + list(t.shape[n:]))
    plate_pos = [i for i in range(n) if i - n in plates]
    other_pos = [i for i in range(t.dim()) if i not in plate_pos]
    return t.permute(plate_pos + other_pos).reshape(math.prod(plates.values()), -1)


def _apply_mask(t: Tensor, mask, n_trailing: int) -> Tensor:
    """Zero ``t`` where ``mask`` is False; ``mask`` aligns with ``t.shape[:-n_trailing]``."""
    if mask is None or mask is True:
        return t
    if mask is False:
        return torch.zeros_like(t)
    mask = mask.reshape(mask.shape + (1,) * n_trailing)
    return torch.where(mask, t, t.new_zeros(()))


def _elementwise_log_prob(fn, value: Tensor) -> tuple[Tensor, int]:
    """``(lp, k)``: ``fn.log_prob(value)`` *before* the sums of every ``Independent`` wrapper,
    shaped ``(*fn.batch_shape, *reinterpreted)`` with ``k = len(reinterpreted)``.

    The base of an ``Independent`` factorises over its batch elements, so each element is a
    datum of its own (``Normal(loc, s).to_event(1)`` over 20 data gives 20 rows, as a plate
    would). ``MaskedDistribution`` / ``ExpandedDistribution`` wrappers are applied on the way
    out; any other distribution gives its own ``log_prob`` (``k = 0``)."""
    if isinstance(fn, Independent):
        lp, k = _elementwise_log_prob(fn.base_dist, value)
        return lp, k + fn.reinterpreted_batch_ndims
    if isinstance(fn, MaskedDistribution):
        lp, k = _elementwise_log_prob(fn.base_dist, value)
        return _apply_mask(lp, fn._mask, k), k
    if isinstance(fn, ExpandedDistribution):
        lp, k = _elementwise_log_prob(fn.base_dist, value)
        event = lp.shape[lp.dim() - k:]
        return lp.expand(torch.broadcast_shapes(lp.shape, fn.batch_shape + event)), k
    return fn.log_prob(value), 0


def _loss_rows(site) -> Tensor:
    """Per-datum log-likelihoods of an observed site: one row per element of its plates (other
    dims summed). A site under no plate has one row per element of the dims its
    ``Independent`` wrappers reinterpret (its data are the event's elements)."""
    plates = _plates(site)
    if plates:
        lp, k = site["fn"].log_prob(site["value"]), 0
    else:
        lp, k = _elementwise_log_prob(site["fn"], site["value"])
    lp = _apply_mask(lp, site["mask"], k)
    n_event = math.prod(lp.shape[lp.dim() - k:])
    rows = _plates_first(lp, plates, k)
    rows = rows.reshape(rows.shape[0], -1, n_event).sum(1).reshape(-1)
    if rows.numel() == 1 and site["value"].numel() > 1:
        warn(
            f"observed site '{site['name']}' gives one Jacobian row for "
            f"{site['value'].numel()} observed values, so the projection sees them as a single "
            "datum: batch dimensions outside a pyro.plate are summed into one row, and so is a "
            f"distribution that does not factorise over its values ({type(site['fn']).__name__}"
            "); declare independent data with pyro.plate, or use .to_event() on an element-wise "
            "distribution.")
    return rows


def _fisher_whitened(d) -> Tensor:
    """``S · f`` ``(*d.batch_shape, *outputs)`` for the base distribution ``d`` with output
    parameter ``f`` and Fisher information ``Λ`` w.r.t. ``f``, ``SᵀS = Λ``, ``S`` detached:

    * ``Categorical`` (``f`` the normalised logits ``l``, probabilities ``p``):
      ``Λ = diag(p) − ppᵀ`` (rank ``C − 1``), ``S = diag(√p) − √p pᵀ``, i.e. row
      ``c = √p_c (l_c − pᵀl)``: ``O(C)`` per datum, no eigendecomposition, nothing divided by a
      small probability (float32-safe). ``S 1 = 0``, so ``S`` applied to the normalised or the
      raw logits has the same Jacobian;
    * ``Bernoulli`` (logits): ``Λ = p(1 − p)``, ``S = √(σ(l) σ(−l))`` (no ``1 − p`` rounding);
    * ``Normal`` (``loc``): ``Λ = 1/σ²``, ``S = 1/σ`` (the scale is not an output here, as for
      ``"output"``).

    Any other distribution: ``ValueError``."""
    if isinstance(d, Categorical):
        logits, p = d.logits, d.probs.detach()
        return p.sqrt() * (logits - (p * logits).sum(-1, keepdim=True))
    if isinstance(d, Bernoulli):
        logits = d.logits
        s = (torch.sigmoid(logits) * torch.sigmoid(-logits)).sqrt().detach()
        return s * logits
    if isinstance(d, Normal):
        return d.loc / d.scale.detach()
    raise ValueError(
        f"jacobian='fisher' knows the Fisher information of Categorical, Bernoulli and Normal "
        f"likelihoods, not of {type(d).__name__}; use jacobian='loss' or jacobian='output'")


def _output_param(fn, fisher: bool = False) -> tuple[Tensor, int]:
    """Output parameter of ``fn`` (Fisher-whitened if ``fisher``: :func:`_fisher_whitened`)
    shaped ``(*fn.batch_shape, *outputs)``, and ``len(outputs)``."""
    d, masks, k = fn, [], 0  # k: batch dims reinterpreted as event dims so far
    while isinstance(d, (Independent, MaskedDistribution, ExpandedDistribution)):
        if isinstance(d, MaskedDistribution):
            masks.append((d._mask, k))
        if isinstance(d, Independent):
            k += d.reinterpreted_batch_ndims
        d = d.base_dist
    attr = next((a for a in ("logits", "loc", "mean") if hasattr(d, a)), None)
    if attr is None and not fisher:
        name = type(d).__name__
        raise ValueError(f"jacobian='output' needs logits, loc or mean; {name} has none")
    param = _fisher_whitened(d) if fisher else getattr(d, attr)
    extra = param.shape[len(d.batch_shape) :]
    param = param.expand(fn.batch_shape + fn.event_shape[:k] + extra)
    for mask, k_above in masks:
        param = _apply_mask(param, mask, k - k_above + len(extra))
    return param, param.dim() - len(fn.batch_shape)


def _output_rows(site, fisher: bool = False) -> Tensor:
    param, n_out = _output_param(site["fn"], fisher)
    param = _apply_mask(param, site["mask"], n_out)
    return _plates_first(param, _plates(site), n_out).reshape(-1)


def _check_subsample(trace, subsample: dict[str, Tensor]) -> None:
    sub_sites = [n for n, s in trace.nodes.items() if site_is_subsample(s)]
    unknown = sorted(set(subsample) - set(sub_sites))
    if unknown:
        raise ValueError(f"subsample names {unknown} are not plates of the model")
    for name in sub_sites:
        if name not in subsample and draws_random_indices(trace, name):
            raise ValueError(
                f"plate '{name}' draws random subsample indices; pass "
                f"subsample={{'{name}': indices}} so every call of f uses the same data."
            )


def make_rows_fn(
    model: Callable,
    layout: LatentLayout,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    jacobian: str = "loss",
    subsample: dict[str, Tensor] | None = None,
    condition: dict[str, Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """Return ``f: z (D,) -> rows (B,)`` for ``model(*args, **kwargs)``.

    ``jacobian="loss"``: rows are per-datum log-likelihoods, so ``jacrev(f)(z)`` ``(B, D)`` is the
    loss Jacobian. ``jacobian="output"``: rows are the output parameters; ``"fisher"``: those
    whitened by the likelihood's Fisher, the kernel being the GGN's (see module docstring).
    ``subsample`` maps plate name -> index tensor, fixing the data of subsampled plates.
    ``condition`` fixes latents outside ``layout`` (e.g. those of other guides) at given values.
    For a batch of ``z`` use ``torch.func.vmap(f)``.
    """
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    kwargs = {} if kwargs is None else kwargs
    subsample = dict(subsample or {})
    condition = dict(condition or {})
    latent_names = tuple(layout.names) + tuple(condition)
    rows_of = {"loss": _loss_rows, "output": _output_rows,
               "fisher": lambda site: _output_rows(site, fisher=True)}[jacobian]

    def f(z: Tensor) -> Tensor:
        if z.dim() != 1:
            raise ValueError(f"f expects z of shape ({layout.latent_dim},); use torch.func.vmap")
        data = {**condition, **layout.unpack(z), **subsample}
        validate = False if _in_functorch_transform() else None
        trace = trace_model(model, args, kwargs, data, validate)
        _check_subsample(trace, subsample)
        sites = observed_sites(trace, latent_names)
        if not sites:
            raise ValueError(_NO_OBS)
        return torch.cat([rows_of(site) for site in sites])

    return f


_NO_OBS = (
    "model has no observed sites, so there is no likelihood to linearise; pass the data with "
    "pyro.sample(name, dist, obs=data) (and call the guide with the data arguments)."
)


def check_observed_site(site) -> None:
    """Raise ``ValueError`` if an observed value is non-finite or outside its support."""
    value, name = site["value"], site["name"]
    if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
        raise ValueError(
            f"observed site '{name}' has non-finite values (NaN/inf); drop those data, or "
            "replace them by finite values and mask them out with poutine.mask (NaN data give "
            "NaN gradients even when masked)."
        )
    try:
        with pyro.validation_enabled(True):
            site["fn"].log_prob(value)
    except ValueError as e:
        raise ValueError(
            f"observed site '{name}' has values outside the support of its distribution "
            f"{type(site['fn']).__name__}; fix the data or the likelihood. ({e})"
        ) from None


def observed_data_frames(trace) -> dict[str, CondIndepStackFrame]:
    """Vectorised plate frames enclosing observed sites whose subsample indices are drawn at
    random (``pyro.plate(name, N, subsample_size=B)`` with ``B < N``).

    A plate given explicit indices (``subsample=idx``) is left out: the model itself fixes its
    data, and a guide must not replay other indices over them.
    """
    frames = {}
    for site in observed_sites(trace):
        for frame in subsampled_frames(site):
            if draws_random_indices(trace, frame.name):
                frames.setdefault(frame.name, frame)
    return frames
