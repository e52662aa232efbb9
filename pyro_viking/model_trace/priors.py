"""Reading the Gaussian prior over the flat latent vector from a model trace."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch import Tensor
from torch.distributions import Independent, Normal, constraints

__all__ = ["unwrap_normal", "isotropic_prior_scale", "closed_form_prior", "isotropic_prior_blocks",
           "gaussian_prior_blocks",           "prior_scale_param", "typical_prior_scale"]


def unwrap_normal(fn) -> Optional[Normal]:
    """The ``Normal`` inside ``Independent``/``Expanded`` wrappers, or ``None``."""
    while isinstance(fn, (Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


def _is_gaussian_site(site) -> bool:
    fn = site["fn"]
    return (unwrap_normal(fn) is not None and fn.support is not None
            and _real(fn.support) and not site.get("is_observed", False))


def _real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def isotropic_prior_scale(trace, names: Iterable[str]) -> Optional[Tensor]:
    """The common scale ``s`` when every named latent has a ``Normal(μ, s)`` prior with one
    shared scalar ``s`` (broadcast or expanded), else ``None``. Keeps the autograd graph."""
    scales = []
    for name in names:
        site = trace.nodes[name]
        if not _is_gaussian_site(site):
            return None
        s = unwrap_normal(site["fn"]).scale
        first = s.reshape(-1)[:1]
        if not (_broadcast_scalar(s) or bool((s == first).all())):
            return None
        scales.append(first[0])
    return _common_scale(scales, exact=False)


def _common_scale(scales: List[Tensor], *, exact: bool) -> Optional[Tensor]:
    """The first of ``scales`` (0-dim) if they are one scale: equal values (``exact``, else
    ``isclose``) computed from the same learnable leaves — equal values of *different*
    learnable scales are not one, as each needs its own gradient. ``None`` otherwise."""
    if not scales:
        return None
    first = scales[0]
    leaves = _autograd_leaves(first)
    for sc in scales[1:]:
        if sc is first:
            continue
        a, b = sc.detach(), first.detach()
        if not bool(a == b if exact else torch.isclose(a, b)) or _autograd_leaves(sc) != leaves:
            return None
    return first


def closed_form_prior(site) -> bool:
    """Whether a latent's prior enters the closed-form KL: a ``Normal`` on the real line,
    without plate scaling."""
    scale_factor = site.get("scale", 1.0)
    return _is_gaussian_site(site) and not torch.is_tensor(scale_factor) and scale_factor == 1.0


def _broadcast_scalar(t: Tensor) -> bool:
    """One value, possibly expanded (``Normal.expand`` gives stride-0 parameters)."""
    return t.numel() == 1 or all(st == 0 for st in t.stride())


def _autograd_leaves(t: Tensor) -> frozenset:
    """Ids of the learnable leaf tensors ``t`` is computed from (e.g. the ``pyro.param`` behind a
    constrained prior scale, re-derived at every model call)."""
    if not t.requires_grad:
        return frozenset()
    if t.grad_fn is None:
        return frozenset([id(t)])
    out, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            out.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return frozenset(out)


def _particle_batch(full_shape, s) -> torch.Size:
    """Batch dims of a prior value of shape ``full_shape`` beyond the latent's own shape
    ``s.shape`` (e.g. vectorised particles), aligned with the guide's batch dims: the latent's
    plate dims (its non-event dims) are size-1 batch dims of the guide's joint latent."""
    extra = full_shape[: len(full_shape) - len(s.shape)]
    return torch.Size(tuple(extra) + (1,) * (len(s.shape) - s.event_dim)) if extra \
        else torch.Size()


def prior_scale_param(trace, scale: Tensor) -> Optional[str]:
    """Name of the ``pyro.param`` site of ``trace`` that *is* the (scalar) prior scale: same
    value, computed from the same learnable leaves. ``None`` if there is none (then the scale
    must be read from a model run)."""
    leaves = _autograd_leaves(scale)
    for name, site in trace.nodes.items():
        v = site.get("value")
        if site["type"] == "param" and torch.is_tensor(v) and v.numel() == 1 \
                and _autograd_leaves(v) == leaves \
                and bool(v.detach().reshape(()) == scale.detach().reshape(())):
            return name
    return None


def typical_prior_scale(trace, names: Iterable[str]) -> Optional[float]:
    """Root mean square of the prior scales of the latents with ``Normal`` priors on the real
    line (``None`` without any): a start for a learned kernel scale."""
    total, count = 0.0, 0
    for name in names:
        site = trace.nodes[name]
        if _is_gaussian_site(site):
            s = unwrap_normal(site["fn"]).scale.detach()
            s = s.expand(site["fn"].batch_shape + site["fn"].event_shape)
            total, count = total + float((s ** 2).sum()), count + s.numel()
    return None if count == 0 else (total / count) ** 0.5


def isotropic_prior_blocks(trace, layout) -> Optional[Tuple[List[Tensor], Tensor, torch.Size]]:
    """``(means, s, batch)`` when every latent has a closed-form ``Normal(μ_site, s)`` prior with
    a scalar mean per site and one common scalar scale ``s`` (the usual BNN prior), else
    ``None``. ``batch`` is the prior's own batch shape (e.g. vectorised particles). Reads only
    the scalar parameters, so no D-sized prior vector is built."""
    means, scales, batch = [], [], torch.Size()
    for s in layout.sites:
        site = trace.nodes[s.name]
        if not closed_form_prior(site):
            return None
        base = unwrap_normal(site["fn"])
        if not (_broadcast_scalar(base.loc) and _broadcast_scalar(base.scale)):
            return None
        scales.append(base.scale.reshape(-1)[0])
        means.append(base.loc.reshape(-1)[0])
        full = site["fn"].batch_shape + site["fn"].event_shape
        batch = torch.broadcast_shapes(batch, _particle_batch(full, s))
    scale = _common_scale(scales, exact=True)
    return None if scale is None else (means, scale, batch)


def gaussian_prior_blocks(trace, layout) -> Tuple[Tensor, Tensor, Tensor, List[str]]:
    """Flat prior ``(loc, scale, mask)`` of shape ``(..., D)`` over the latent vector.

    ``mask`` marks coordinates whose site has a ``Normal`` prior on the real line and no plate
    scaling (closed-form KL); the remaining sites' names are returned for a Monte Carlo KL.
    Broadcasting leading dims (e.g. vectorised particles) are kept.
    """
    locs, scales, masks, others = [], [], [], []
    for s in layout.sites:
        site = trace.nodes[s.name]
        ok = closed_form_prior(site)
        if ok:
            base = unwrap_normal(site["fn"])
            loc = base.loc.expand(site["fn"].batch_shape + site["fn"].event_shape)
            scl = base.scale.expand(loc.shape)
            batch = _particle_batch(loc.shape, s)
            locs.append(loc.reshape(batch + (-1,)))
            scales.append(scl.reshape(batch + (-1,)))
            masks.append(torch.ones(s.numel, dtype=torch.bool))
        else:
            others.append(s.name)
            z = torch.zeros(s.numel)
            locs.append(z)
            scales.append(torch.ones(s.numel))
            masks.append(torch.zeros(s.numel, dtype=torch.bool))
    ref = next((t for t in scales if t.dim() > 1 or t.requires_grad), scales[0])
    batch = torch.broadcast_shapes(*[t.shape[:-1] for t in locs + scales])

    def cat(parts):
        return torch.cat([p.to(ref).expand(batch + p.shape[-1:]) for p in parts], -1)

    return cat(locs), cat(scales), torch.cat(masks).to(ref.device), others


