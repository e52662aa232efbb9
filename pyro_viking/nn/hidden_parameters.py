"""The network parameters left out of the posterior ("hidden"): point estimates or constants.

A hidden parameter is learned, as the ``pyro.param`` of its site name, when the network is built
with ``fit_hidden=True`` and the parameter has ``requires_grad``; otherwise (a frozen layer, or
``fit_hidden=False``) it is a constant. A learned one starts from a *copy* of the network's value:
training moves the param-store entry, never the network's own tensor (the network is an input of
the model, not its state; :func:`copy_learned` copies the values in when asked). With
``module_local_params`` on, the learned ones are parameters of the model instead
(:func:`~pyro_viking.nn.scales.model_param`).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from pyro_viking.nn.scales import learned_value, model_param

__all__ = ["copy_learned", "hidden_values", "learned_hidden"]

#: a network parameter's name → its Pyro site (or ``pyro.param``) name
SiteName = Callable[[str], str]


def learned_hidden(net: nn.Module, names: Sequence[str], fit_hidden: bool) -> Tuple[str, ...]:
    """The hidden parameters among ``names`` that are learned as ``pyro.param`` (those with
    ``requires_grad``, when ``fit_hidden``), in the order given."""
    return tuple(n for n in names if fit_hidden and net.get_parameter(n).requires_grad)


def hidden_values(net: nn.Module, names: Sequence[str], fit_hidden: bool,
                  site_name: SiteName, owner: nn.Module) -> Dict[str, Tensor]:
    """The current values of the hidden parameters ``names``: the learned parameter
    ``site_name(n)`` of the model ``owner`` (:func:`~pyro_viking.nn.scales.model_param`: a
    ``pyro.param``, created from a copy of the network's value) for the learned ones, the
    network's value detached for the constants."""
    learned = set(learned_hidden(net, names, fit_hidden))
    values = {}
    for n in names:
        p = net.get_parameter(n)
        values[n] = model_param(owner, site_name(n), lambda p=p: p.detach().clone()) \
            if n in learned else p.detach()
    return values


@torch.no_grad()
def copy_learned(net: nn.Module, names: Sequence[str], fit_hidden: bool,
                 site_name: SiteName, owner: nn.Module) -> nn.Module:
    """Copy the current values of the learned hidden parameters among ``names`` (those created:
    :func:`~pyro_viking.nn.scales.learned_value` of ``owner``) into the network's own tensors;
    returns ``net``."""
    for n in learned_hidden(net, names, fit_hidden):
        value = learned_value(owner, site_name(n))
        if value is not None:
            net.get_parameter(n).copy_(value)
    return net
