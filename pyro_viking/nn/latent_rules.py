"""Which parameters of a network are latent, and whether its rows are deterministic.

A :data:`Rule` selects parameters by name or owner; :func:`select_latent` applies a rule or a
list of them. :func:`check_deterministic` refuses the modules that would make ``f(x_i; θ)``
random (dropout in training mode) or dependent on the other rows of the batch (batch norm with
minibatch statistics, unless it runs on running statistics: :mod:`pyro_viking.nn.batch_norm`):
VIKING needs one fixed Jacobian row per datum.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["Rule", "batch_dependent_modules", "check_deterministic", "rule_matches",
           "select_latent", "split_parameters"]

#: A rule selecting latent parameters: a glob pattern or module/parameter name prefix
#: (``"fc3"``, ``"*.weight"``), a module type (``nn.Conv2d``), or ``rule(name, parameter)``.
Rule = Union[str, type, Callable[[str, nn.Parameter], bool]]


def rule_matches(rule: Rule, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    """Whether ``rule`` selects the parameter ``param`` named ``name`` (as in
    ``named_parameters()``) of the module ``owner``; ``TypeError`` for an unknown rule."""
    if isinstance(rule, str):
        return fnmatchcase(name, rule) or name == rule or name.startswith(rule + ".")
    if isinstance(rule, type):
        return isinstance(owner, rule)
    if callable(rule):
        return bool(rule(name, param))
    raise TypeError(f"latent rules are strings, module types or callables, got {rule!r}")


def select_latent(net: nn.Module, latent: Optional[Union[Rule, Sequence[Rule]]]) -> List[str]:
    """Names (as in ``net.named_parameters()``, in that order) of the parameters selected by
    ``latent`` (``None``: all); ``ValueError`` if a rule selects none."""
    named = list(net.named_parameters())
    if latent is None:
        return [n for n, _ in named]
    rules = list(latent) if isinstance(latent, (list, tuple)) else [latent]
    chosen = []
    for rule in rules:
        hits = [n for n, p in named
                if rule_matches(rule, n, p, net.get_submodule(n.rpartition(".")[0]))]
        if not hits:
            raise ValueError(f"latent rule {rule!r} selects no parameter of the network; its "
                             f"parameters are {[n for n, _ in named]}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n, _ in named if n in chosen]  # network order


def split_parameters(net: nn.Module, latent: Optional[Union[Rule, Sequence[Rule]]]
                     ) -> Tuple[Dict[str, torch.Size], Tuple[str, ...]]:
    """The latent parameters' shapes (name → shape) and the other, hidden, parameters' names,
    both in network order, for the rules ``latent`` (as :func:`select_latent`)."""
    latent_names = select_latent(net, latent)
    params = dict(net.named_parameters())
    shapes = {n: params[n].shape for n in latent_names}
    return shapes, tuple(n for n in params if n not in latent_names)


def batch_dependent_modules(net: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the modules whose output can be random or depend on the other rows
    of the batch (dropout, batch norm), whatever their current mode."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return [(n, m) for n, m in net.named_modules() if isinstance(m, kinds)]


def check_deterministic(modules: List[Tuple[str, nn.Module]],
                        batch_norm: Optional[str] = None) -> None:
    """Raise ``ValueError`` if a dropout layer is active (with ``p > 0``: dropout with ``p = 0`` is
    the identity) or a batch norm uses the statistics of its minibatch: ``f(x_i; θ)`` must be a
    fixed function of ``x_i`` and ``θ``. With ``batch_norm="running"`` a batch norm in training
    mode is accepted (it is evaluated on its running statistics); one without running
    statistics (``track_running_stats=False``) never is."""
    for name, m in modules:
        kind = type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"the network's module '{name}' ({kind}) is in training mode: dropout makes "
                "f(x; θ) random, so the likelihood and its Jacobian change from call to call. "
                "Call net.eval() before building the BayesianNetwork (the posterior over the "
                "weights takes dropout's place), or remove the layer.")
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if m.running_mean is None:
            raise ValueError(
                f"the network's module '{name}' ({kind}) has no running statistics "
                "(track_running_stats=False), so it always normalises with the statistics of "
                "each minibatch and one datum's likelihood depends on the other data. Build it "
                "with track_running_stats=True, or use nn.LayerNorm or nn.GroupNorm.")
        if m.training and batch_norm != "running":
            raise ValueError(
                f"the network's module '{name}' ({kind}) normalises with the statistics of "
                "each minibatch, so one datum's likelihood depends on the other data and the "
                "per-datum Jacobian rows VIKING needs do not exist. Call net.eval() to use its "
                "running statistics (e.g. those of a pre-trained network), pass "
                "batch_norm='running' to evaluate it on running statistics that training "
                "updates at the posterior mean, or use nn.LayerNorm or nn.GroupNorm.")
