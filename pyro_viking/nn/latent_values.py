"""The latent parameters' values between a network and its Pyro sites: the init strategy that
starts the latent sites at the network's own values, and latent values keyed by site name
copied into the network.

A latent parameter ``n`` of the network is the sample site ``site_name(n)``
(``f"{prefix}.{n}"`` in a :class:`~pyro_viking.BayesianNetwork`).
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch import Tensor, nn

__all__ = ["copy_latent", "init_to_network"]


def init_to_network(net: nn.Module, prefix: str, latent: Mapping[str, torch.Size],
                    site: dict) -> Tensor:
    """Pyro init strategy: the current value of the parameter ``n`` of ``net`` for the site
    ``f"{prefix}.{n}"`` when ``n`` is among the ``latent`` names, ``init_to_median`` for any
    other site."""
    name = site["name"]
    n = name[len(prefix) + 1:] if name.startswith(prefix + ".") else ""
    if n in latent:
        value = net.get_parameter(n).detach().clone()
        return init_to_value(site, values={name: value}, fallback=init_to_median)
    return init_to_median(site)


@torch.no_grad()
def copy_latent(net: nn.Module, latent: Mapping[str, torch.Size],
                site_name: Callable[[str], str], values: Dict[str, Tensor]) -> None:
    """Copy ``values[site_name(n)]`` into the parameter ``n`` of ``net``, for each of the
    ``latent`` names present in ``values``."""
    for n in latent:
        if site_name(n) in values:
            net.get_parameter(n).copy_(values[site_name(n)])
