"""What trains a phase of the VIKING recipe (``fit_viking(..., engine=)``): Pyro's
:class:`~pyro.infer.SVI`, or the ELBO as a PyTorch module stepped by one ``torch.optim``
optimiser per group of parameters (:class:`ModuleStepper`).

Both take the same steps. ``SVI.step`` records the parameters a step reads (a parameter-only
trace), calls the ELBO's ``loss_and_grads``, steps one ``torch.optim`` optimiser *per
parameter* (:class:`~pyro.optim.PyroOptim`) and zeroes their gradients. :class:`ModuleStepper`
evaluates the ELBO module ``loss(model, guide)`` (``ELBOModule``: ``differentiable_loss``, the
fused step of :class:`~pyro_viking.TraceViking_ELBO` where it applies) under the same trace,
runs ``backward``, and steps :class:`TorchOptimisers`: the per-parameter optimisers of the
``PyroOptim`` merged into one ``torch.optim`` optimiser per group of parameters that were
first seen in the same step with the same arguments and have been stepped together since
(split when a step reads only some of them), so the state, the arguments (``optim_args`` as a
dict, or a callable of the parameter's name: ``scales_lr_factor``), a learning-rate decay
(``ClippedAdam``'s ``lrd``) and gradient clipping (``clip_args``) are those of the per-parameter
optimisers. Parameters stay where Pyro keeps them (the param store, shared with the guide's
modules), so a fit leaves the store as ``SVI`` does.

The optimiser state of a ``PyroOptim`` lives, for this engine, in the :class:`TorchOptimisers`
kept for it (:func:`torch_optimisers`, for as long as the ``PyroOptim`` lives): phases of one fit
that share the ``PyroOptim`` share it, as under ``SVI``. It is shared with the ``PyroOptim``'s
own per-parameter optimisers both ways: a parameter that the ``PyroOptim`` already holds state
for (``SVI`` stepped it, or ``set_state``/``load`` gave it) continues from that state, and after
each phase (:meth:`ModuleStepper.sync`) the ``PyroOptim`` holds one optimiser per parameter
sharing this engine's state, so ``get_state``/``save`` and an ``SVI`` that takes over see what
``SVI`` would have left.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

import pyro.poutine as poutine
import torch
from pyro.infer import SVI
from pyro.infer.elbo import ELBO
from pyro.optim import PyroOptim
from pyro.optim.optim import _load_state_dict
from pyro.params.param_store import (
    module_from_param_with_module_name,
    normalize_param_name,
    user_param_name,
)
from torch import Tensor
from torch.nn.utils import clip_grad_norm_, clip_grad_value_

__all__ = ["DEFAULT_ENGINE", "ENGINES", "ModuleStepper", "TorchOptimisers", "make_stepper",
           "module_optimiser_problem", "resolve_engine", "torch_optimisers"]

#: ``"svi"``: Pyro's ``SVI``; ``"module"``: :class:`ModuleStepper`; ``"auto"``: ``"module"``
#: where the optimiser allows it (:func:`module_optimiser_problem`), else ``"svi"``
ENGINES = ("svi", "module", "auto")
#: the engine of ``fit_viking`` and ``select_beta`` when none is named: the module engine where
#: the optimiser allows it (the same steps as ``SVI``, without its per-parameter optimisers;
#: the cost per pass of both engines is compared in ``docs/scaling_out.md``), else ``SVI``
DEFAULT_ENGINE = "auto"


def module_optimiser_problem(optim) -> Optional[str]:
    """Why ``optim`` cannot drive the ``"module"`` engine, or ``None`` when it can: it must be a
    plain :class:`~pyro.optim.PyroOptim` (``pyro.optim.Adam``, ``ClippedAdam``, ``SGD``, ...)
    wrapping a ``torch.optim.Optimizer`` other than ``LBFGS``."""
    name = type(optim).__name__
    inner = getattr(optim, "pt_scheduler_constructor", None)  # pyro.optim's schedulers
    name = f"{name}({inner.__name__})" if isinstance(inner, type) else name
    if type(optim) is not PyroOptim:
        return (f"the optimiser {name} is not a plain pyro.optim.PyroOptim (schedulers, "
                "multi-optimisers and other wrappers step through SVI only)")
    ctor = optim.pt_optim_constructor
    if not (isinstance(ctor, type) and issubclass(ctor, torch.optim.Optimizer)):
        return f"the optimiser's constructor {ctor!r} is not a torch.optim.Optimizer class"
    if issubclass(ctor, torch.optim.LBFGS):
        return "LBFGS needs a closure, which neither engine passes"
    return None


def resolve_engine(engine: str, optim) -> str:
    """``"svi"`` or ``"module"`` for ``engine`` (one of :data:`ENGINES`) and the Pyro optimiser
    ``optim``; ``ValueError`` for another name, or ``"module"`` with an optimiser it cannot
    take (the message names the optimiser and the fix)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    problem = module_optimiser_problem(optim)
    if engine == "auto":
        return "svi" if problem else "module"
    if engine == "module" and problem:
        raise ValueError(f"engine='module' steps torch.optim optimisers built from a Pyro "
                         f"optimiser, but {problem}: pass engine='svi' (or 'auto').")
    return engine


def _optim_args(args, argc: int, name: str) -> dict:
    """``PyroOptim``'s arguments for the parameter ``name``: the dict, or the callable's answer
    (one argument: the normalised name; two: module and parameter name)."""
    if not callable(args):
        return args
    value = args(normalize_param_name(name)) if argc == 1 else \
        args(module_from_param_with_module_name(name), user_param_name(name))
    if not isinstance(value, dict):
        raise TypeError(f"the optimiser's per-parameter arguments for {name!r} must be a dict, "
                        f"got {type(value).__name__}")
    return value


def _same(a: dict, b: dict) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # tensors among the values
        return False


class TorchOptimisers:
    """The per-parameter optimisers of a :class:`~pyro.optim.PyroOptim` (module docstring) as
    few ``torch.optim`` optimisers. :meth:`step` steps the parameters one training step read
    (by Pyro name) and zeroes their gradients, as ``SVI.step`` does."""

    def __init__(self, optim: PyroOptim):
        self.optim = optim
        self.owner: Dict[Tensor, torch.optim.Optimizer] = {}  # parameter -> its optimiser
        self.clip: Dict[Tensor, dict] = {}  # parameter -> its clip arguments
        self._created: Dict[torch.optim.Optimizer, dict] = {}  # optimiser -> its arguments
        self._plans: Dict[frozenset, List[torch.optim.Optimizer]] = {}

    def step(self, params: Dict[str, Tensor]) -> None:
        """One optimiser step of the parameters ``{Pyro name: unconstrained tensor}``."""
        key = frozenset(map(id, params.values()))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(params)
        for p in params.values():
            clip = self.clip[p]
            if clip.get("clip_norm") is not None:
                clip_grad_norm_(p, clip["clip_norm"])
            if clip.get("clip_value") is not None:
                clip_grad_value_(p, clip["clip_value"])
        for optimiser in plan:
            optimiser.step()
        for p in params.values():
            if p.grad is not None:
                p.grad.zero_()

    def _plan(self, params: Dict[str, Tensor]) -> List[torch.optim.Optimizer]:
        """The optimisers that step exactly ``params``: new parameters grouped by arguments,
        groups of which only a part is read split (state and arguments kept)."""
        read = set(map(id, params.values()))
        for optimiser in {self.owner[p] for p in params.values() if p in self.owner}:
            group = optimiser.param_groups[0]["params"]
            if not all(id(p) in read for p in group):
                for part in ([p for p in group if id(p) in read],
                             [p for p in group if id(p) not in read]):
                    self._rebuild(optimiser, part)
                del self._created[optimiser]
        # (arguments, clip arguments, the PyroOptim's group hyperparameters, parameters, their
        # PyroOptim states): grouped by all three
        new: List[tuple] = []
        for name, p in params.items():
            if p in self.owner or any(p is q for *_, ps, _ in new for q in ps):
                continue
            args = _optim_args(self.optim.pt_optim_args,
                               getattr(self.optim, "pt_optim_args_argc", 1), name)
            clip = _optim_args(self.optim.pt_clip_args, 2, name)
            state, group = self._pyro_state(name, p)
            match = next((g for g in new if _same(g[0], args) and _same(g[1], clip)
                          and _same(g[2], group)), None)
            if match is None:
                new.append((args, clip, group, [p], [state]))
            else:
                match[3].append(p)
                match[4].append(state)
        for args, clip, group, ps, states in new:
            optimiser = self.optim.pt_optim_constructor([{"params": ps, **(group or {})}],
                                                        **args)
            self._created[optimiser] = args
            for p, state in zip(ps, states):
                self.owner[p], self.clip[p] = optimiser, clip
                if state is not None:  # shared: the PyroOptim's optimiser sees every step
                    optimiser.state[p] = state
        self._plans.clear()  # the groups changed: every cached plan is stale
        return list({id(o): o for o in (self.owner[p] for p in params.values())}.values())

    def _pyro_state(self, name: str, p: Tensor) -> Tuple[Optional[dict], Optional[dict]]:
        """``(state, group hyperparameters)`` of ``p`` in the ``PyroOptim``'s own optimiser for
        it (made from state loaded into the ``PyroOptim`` where it has none yet, as its
        ``__call__`` would), or ``(None, None)``."""
        own = self.optim.optim_objs.get(p)
        if own is None:
            loaded = self.optim._state_waiting_to_be_consumed.pop(name, None)
            if loaded is None:
                return None, None
            own = self._own_optimiser(p)
            _load_state_dict(own, loaded)
        return own.state[p], {k: v for k, v in own.param_groups[0].items() if k != "params"}

    def _own_optimiser(self, p: Tensor) -> torch.optim.Optimizer:
        """The ``PyroOptim``'s own optimiser of ``p``, made (with its clipping) as its
        ``__call__`` makes one where it has none."""
        optim = self.optim
        if p not in optim.optim_objs:
            optim.optim_objs[p] = optim._get_optim(p)
            optim.grad_clip[p] = optim._get_grad_clip(p)
        return optim.optim_objs[p]

    def sync(self) -> None:
        """Give the ``PyroOptim`` one optimiser per parameter stepped here (as ``SVI`` leaves
        it), holding this engine's state for it (the same tensors) and its group's current
        hyperparameters (e.g. a decayed learning rate): its ``get_state``, ``save`` and an
        ``SVI`` that takes over continue from here."""
        for p, optimiser in self.owner.items():
            own = self._own_optimiser(p)
            group = next(g for g in optimiser.param_groups if any(q is p for q in g["params"]))
            own.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
            own.state[p] = optimiser.state[p]

    def _rebuild(self, optimiser: torch.optim.Optimizer, params: List[Tensor]) -> None:
        """A new optimiser of ``params`` (part of ``optimiser``'s group) with the group's
        current arguments (e.g. a decayed learning rate) and their state."""
        group = {k: v for k, v in optimiser.param_groups[0].items() if k != "params"}
        new = type(optimiser)([{"params": params, **group}], **self._created[optimiser])
        self._created[new] = self._created[optimiser]
        for p in params:
            if p in optimiser.state:
                new.state[p] = optimiser.state[p]
            self.owner[p] = new


_OPTIMISERS: weakref.WeakKeyDictionary[PyroOptim, TorchOptimisers] = \
    weakref.WeakKeyDictionary()


def torch_optimisers(optim: PyroOptim) -> TorchOptimisers:
    """The :class:`TorchOptimisers` of ``optim`` (made at the first call, kept while ``optim``
    lives): every phase trained with ``optim`` continues its parameters' state."""
    optimisers = _OPTIMISERS.get(optim)
    if optimisers is None:
        optimisers = _OPTIMISERS[optim] = TorchOptimisers(optim)
    return optimisers


class ModuleStepper:
    """``SVI(model, guide, optim, loss)``'s training step on the ELBO module
    ``loss(model, guide)`` (module docstring): :meth:`step` returns the loss as a float, and
    ``optim`` is the Pyro optimiser, as on ``SVI``."""

    def __init__(self, model: Callable, guide: Callable, optim: PyroOptim, loss: ELBO):
        problem = module_optimiser_problem(optim)
        if problem:
            raise ValueError(f"ModuleStepper: {problem}; use SVI")
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.module = loss(model, guide)
        self.optimisers = torch_optimisers(optim)

    def step(self, *args, **kwargs) -> float:
        """One step on ``model(*args, **kwargs)``: the loss, its gradients, the optimiser step
        of the parameters it read, their gradients zeroed."""
        with poutine.trace(param_only=True) as capture:
            loss = self.module(*args, **kwargs)
        params: Dict[str, Tensor] = {}
        for site in capture.trace.nodes.values():  # a tensor read under two names: once
            p = site["value"].unconstrained()
            if all(p is not q for q in params.values()):
                params[site["name"]] = p
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        self.optimisers.step(params)
        return float(loss.detach()) if torch.is_tensor(loss) else float(loss)

    def sync(self) -> None:
        """Hand the optimiser state to the Pyro optimiser (:meth:`TorchOptimisers.sync`): after
        the last step of a phase, for ``optim.get_state()``, ``optim.save`` or ``SVI``."""
        self.optimisers.sync()


def make_stepper(engine: str, model: Callable, guide: Callable, optim: PyroOptim,
                 loss: ELBO) -> Union[SVI, ModuleStepper]:
    """What steps one phase: ``SVI`` (``engine="svi"``) or a :class:`ModuleStepper`
    (``"module"``); ``"auto"`` as :func:`resolve_engine` decides."""
    engine = resolve_engine(engine, optim)
    if engine == "svi":
        return SVI(model, guide, optim, loss)
    return ModuleStepper(model, guide, optim, loss)
