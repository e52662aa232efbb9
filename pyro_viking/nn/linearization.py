"""A network's output under given parameters, or under its linearisation around reference ones.

    f(x; θ),   or   f_lin(x; θ) = f(x; θ_ref) + J_f(x; θ_ref) (θ − θ_ref)

The linearised network is the model VIKING's kernel is exact for: a step along the kernel of the
output Jacobian at θ_ref leaves f_lin unchanged at the training inputs, however large it is.
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor, nn
from torch.func import functional_call, jvp

from pyro_viking.nn.target_checks import one_tensor

__all__ = ["network_output"]


def network_output(network: nn.Module, params: Dict[str, Tensor], x: Tensor,
                   linearise_at: Optional[Dict[str, Tensor]] = None, *,
                   tie_weights: bool = True) -> Tensor:
    """``network(x)`` evaluated with the parameters ``params`` (name → tensor, as in
    ``network.named_parameters()``; e.g. Pyro samples), or, given ``linearise_at`` (some or all
    of those names), its linearisation in those parameters,
    ``f(x; θ_ref) + J_f(x; θ_ref) (θ − θ_ref)``, the others held at their ``params`` values: one
    forward-mode product (``torch.func.jvp``), no Jacobian is formed. Parameters missing from
    ``params`` keep the module's own values. Shape: that of ``network(x)``; ``TypeError``
    unless the network returns one tensor. ``tie_weights=False`` (as in ``functional_call``)
    skips untying tied tensors, a walk over the whole network that only a network with tied
    tensors needs (:func:`~pyro_viking.nn.weight_samples.has_tied_tensors`)."""
    if linearise_at is None:
        return one_tensor(functional_call(network, params, (x,), tie_weights=tie_weights))
    step = {name: params[name] - linearise_at[name] for name in linearise_at}
    f_ref, f_step = jvp(lambda p: one_tensor(functional_call(network, {**params, **p}, (x,),
                                                             tie_weights=tie_weights)),
                        (linearise_at,), (step,))
    return f_ref + f_step
