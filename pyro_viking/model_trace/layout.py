"""The flat unconstrained latent vector of a Pyro model.

All continuous latent sites of a prototype trace (``trace.iter_stochastic_nodes()`` order, plate
subsample sites skipped) are mapped to unconstrained space with ``biject_to(site["fn"].support)``,
flattened and concatenated into ``z`` of shape ``(D,)`` (Pyro's ``AutoContinuous``
convention). :class:`LatentLayout` does the (un)packing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to, constraints

__all__ = ["LatentLayout", "LatentSite"]


@dataclass(frozen=True)
class LatentSite:
    """One latent site: ``z[offset:offset + numel]`` viewed as ``unconstrained_shape``."""

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    transform: torch.distributions.Transform
    is_identity: bool
    offset: int
    event_dim: int = 0  # of the site's distribution (plate dims of ``shape`` are batch dims)

    @property
    def numel(self) -> int:
        return math.prod(self.unconstrained_shape)


def _is_real(constraint) -> bool:
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint is constraints.real


class LatentLayout:
    """How the flat unconstrained vector ``z`` of shape ``(D,)`` splits into latent sites."""

    def __init__(self, sites: list[LatentSite]):
        self.sites = tuple(sites)
        self.latent_dim: int = sum(s.numel for s in sites)

    @classmethod
    def from_trace(cls, prototype_trace) -> LatentLayout:
        """Build from a trace: one entry per non-observed, non-subsample sample site.

        Raises ``ValueError`` (as Pyro's autoguides do) for discrete or spherical supports.
        """
        sites, offset = [], 0
        for name, site in prototype_trace.iter_stochastic_nodes():
            if site_is_subsample(site):
                continue
            with helpful_support_errors(site):
                transform = biject_to(site["fn"].support)
                ushape = transform.inv(site["value"].detach()).shape
            real = _is_real(site["fn"].support)
            sites.append(LatentSite(name, site["value"].shape, ushape, transform, real, offset,
                                    site["fn"].event_dim))
            offset += sites[-1].numel
        return cls(sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def unpack(self, z: Tensor) -> dict[str, Tensor]:
        """``z (..., D)`` -> ``{name: constrained value (..., *site.shape)}``.

        Real-supported sites are returned as views of ``z`` (no copy, no transform).
        """
        batch, values = z.shape[:-1], {}
        for s, part in zip(self.sites, self.split(z)):
            u = part.reshape(batch + s.unconstrained_shape)
            values[s.name] = u if s.is_identity else s.transform(u)
        return values

    def split(self, z: Tensor) -> tuple[Tensor, ...]:
        """``z (..., D)`` -> one ``(..., numel)`` view per site, by one ``split``: per-site slices
        would each allocate a full ``(..., D)`` buffer in their backward (and under vmap)."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"expected z of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        return z.split([s.numel for s in self.sites], dim=-1)

    def batch_views(self, z: Tensor):
        """``(name, unconstrained value)`` per site for a batch ``z (*batch, D)`` whose batch
        dims are plate dims (Pyro's ``AutoContinuous._unpack_latent`` shapes: a site's own
        plate dims broadcast against the trailing batch dims)."""
        batch = z.shape[:-1]
        for s, part in zip(self.sites, self.split(z)):
            event_dim = s.event_dim + len(s.unconstrained_shape) - len(s.shape)
            yield s.name, part.view(torch.broadcast_shapes(s.unconstrained_shape,
                                                           batch + (1,) * event_dim))

    def pack(self, values: dict[str, Tensor]) -> Tensor:
        """``{name: constrained value (..., *site.shape)}`` -> unconstrained ``z (..., D)``."""
        parts = []
        for s in self.sites:
            v = values[s.name]
            u = v if s.is_identity else s.transform.inv(v)
            parts.append(u.reshape(v.shape[: v.dim() - len(s.shape)] + (s.numel,)))
        batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], dim=-1)

    def check_shapes(self, trace, allow_extra: bool = False) -> None:
        """Raise ``ValueError`` if the latent sites of ``trace`` differ from this layout
        (``allow_extra``: latents outside the layout are allowed)."""
        found = {n: s for n, s in trace.iter_stochastic_nodes() if not site_is_subsample(s)}
        for s in self.sites:
            if s.name not in found:
                raise ValueError(
                    f"model was set up with latent '{s.name}', which it no longer samples; "
                    "create a new guide for the changed model."
                )
            shape = tuple(found[s.name]["value"].shape)
            if shape != tuple(s.shape):
                raise ValueError(
                    f"model was set up with latent '{s.name}' of shape {tuple(s.shape)}, now "
                    f"called with {shape}; create a new guide (latent shapes must not change "
                    "between calls)."
                )
        extra = sorted(set(found) - set(self.names))
        if extra and not allow_extra:
            raise ValueError(
                f"model samples latent(s) {extra} unknown to the guide; create a new guide."
            )


