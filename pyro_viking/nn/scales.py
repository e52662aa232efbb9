"""Positive scales that are either fixed or learned (the prior's ``s`` and the noise's ``σ``), and
where a model's learned parameters live.

A scale argument is a positive float (kept fixed) or ``"learned"`` (a learned parameter with a
positive constraint, created at its initial value on first use).

A learned parameter of a model that is an ``nn.Module`` but not a ``PyroModule`` (a
:class:`~pyro_viking.BayesianNetwork`) is read by :func:`model_param`:

* by default, as ``pyro.param(name, init, constraint=...)`` in Pyro's global param store (what
  ``SVI`` and ``pyro.optim`` optimise);
* with ``pyro.settings.set(module_local_params=True)`` (Pyro's mode for training with a
  ``torch.optim`` optimiser, DDP or Lightning, where a global ``pyro.param`` inside a
  ``PyroModule`` guide is refused), as a parameter of the model itself: the unconstrained value
  is an ``nn.Parameter`` of the submodule :class:`ModelParams` ``owner.local_params``, created
  from ``init`` at first use, so ``elbo(model, guide).parameters()`` holds it. It is read through
  a ``param`` statement that never touches the param store, as ``PyroModule`` reads its own
  parameters in that mode: handlers see the site (``SVI``'s parameter capture, a trace) with the
  constrained value, whose ``.unconstrained()`` is the ``nn.Parameter``.

Both give the same value, with the same constraint transform, so the two training paths take
the same steps (``tests/infer/test_module_path.py``).
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Union

import pyro
import torch
from pyro.poutine.runtime import effectful
from torch import Tensor, nn
from torch.distributions import constraints, transform_to
from torch.distributions.constraints import Constraint

__all__ = ["LEARNED", "ModelParams", "learned_value", "model_param", "parse_scale",
           "scale_value"]

LEARNED = "learned"

#: an initial value, or a function giving it (called once, at creation)
Init = Union[Tensor, Callable[[], Tensor]]


def parse_scale(value: Union[float, str], what: str) -> Optional[float]:
    """``None`` for ``"learned"``, else ``value`` as a float; ``ValueError`` unless positive."""
    if value == LEARNED:
        return None
    if isinstance(value, str) or not float(value) > 0:
        raise ValueError(f"{what} must be a positive float or '{LEARNED}', got {value!r}")
    return float(value)


def _module_local() -> bool:
    return bool(pyro.settings.get("module_local_params"))


def _key(name: str) -> str:
    # a Pyro name ("bnn.0.weight") as an nn.Module parameter name, which may not hold "."
    return name.replace(".", "/")


class ModelParams(nn.Module):
    """The module-local learned parameters of one model, by Pyro name: unconstrained
    ``nn.Parameter`` s (registered under the name with ``"."`` written ``"/"``) and their
    constraints."""

    def __init__(self):
        super().__init__()
        self.constraints: Dict[str, Constraint] = {}

    def __contains__(self, name: str) -> bool:
        return _key(name) in self._parameters

    def value(self, name: str) -> Tensor:
        """The constrained value of ``name`` (with ``.unconstrained()``, as the param store's)."""
        unconstrained = self._parameters[_key(name)]
        value = transform_to(self.constraints[name])(unconstrained)
        value.unconstrained = weakref.ref(unconstrained)
        return value

    def setdefault(self, name: str, init: Init, constraint: Constraint) -> Tensor:
        """:meth:`value` of ``name``, created from ``init`` (constrained) if it is new, as
        ``ParamStoreDict.setdefault`` creates a parameter."""
        if name not in self:
            with torch.no_grad():
                start = (init() if callable(init) else init).detach()
                unconstrained = transform_to(constraint).inv(start).contiguous()
            self.register_parameter(_key(name), nn.Parameter(unconstrained))
            self.constraints[name] = constraint
        return self.value(name)


def _local_params(owner: nn.Module) -> ModelParams:
    params = owner._modules.get("local_params")
    if params is None:
        params = ModelParams()
        owner.add_module("local_params", params)
    return params


def model_param(owner: nn.Module, name: str, init: Init,
                constraint: Constraint = constraints.real) -> Tensor:
    """The learned parameter ``name`` of the model ``owner`` (constrained value):
    ``pyro.param(name, init, constraint=constraint)``, or with ``module_local_params`` on, the
    parameter kept in ``owner.local_params`` behind a ``param`` statement (module docstring)."""
    if not _module_local():
        return pyro.param(name, init, constraint=constraint)
    value = _local_params(owner).setdefault(name, init, constraint)
    read = effectful(lambda *args, **kwargs: value, type="param")
    return read(name, init, constraint=constraint, event_dim=None, name=name)


def learned_value(owner: nn.Module, name: str) -> Optional[Tensor]:
    """The current value of the learned parameter ``name`` of ``owner`` where
    :func:`model_param` keeps it in the current mode, or ``None`` if it has not been created."""
    if not _module_local():
        store = pyro.get_param_store()
        return store[name] if name in store else None
    params = owner._modules.get("local_params")
    return params.value(name) if params is not None and name in params else None


def scale_value(owner: nn.Module, kind: str, like: Tensor) -> Tensor:
    """The scale ``kind`` (``"prior"``, ``"noise"``) of the model ``owner`` now, a 0-dim tensor of
    ``like``'s dtype and device: the fixed ``owner.{kind}_scale``, or (that being ``None``) the
    positive learned parameter ``owner.{kind}_scale_name`` (:func:`model_param`) initialised at
    ``owner.init_{kind}_scale``."""
    fixed = getattr(owner, f"{kind}_scale")
    if fixed is not None:
        return torch.tensor(fixed, dtype=like.dtype, device=like.device)
    init = torch.tensor(getattr(owner, f"init_{kind}_scale"), dtype=like.dtype,
                        device=like.device)
    return model_param(owner, getattr(owner, f"{kind}_scale_name"), init,
                       constraint=constraints.positive)
