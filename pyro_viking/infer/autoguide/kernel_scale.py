"""The σ_ker policy of :class:`~pyro_viking.AutoViking` (``kernel_scale=``): tied to the model's
common prior scale, learned, or fixed; :class:`TiedPriorScale` reads the tied scale at each call."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import pyro
import torch
from torch import Tensor
from torch.distributions import transform_to

from pyro_viking.model_trace.priors import (
    isotropic_prior_scale,
    prior_scale_param,
    typical_prior_scale,
)
from pyro_viking.model_trace.rows import trace_model

__all__ = ["KERNEL_SCALES", "TiedPriorScale", "check_scale_arguments", "resolve_kernel_scale"]

KERNEL_SCALES = ("auto", "prior", "learned")


def check_scale_arguments(kernel_scale, init_image_scale: float,
                          init_kernel_scale: Optional[float]) -> None:
    """Raise ``ValueError`` for a ``kernel_scale`` that is neither a positive float nor one of
    :data:`KERNEL_SCALES`, or non-positive initial scales."""
    fixed = isinstance(kernel_scale, (int, float))
    if not (fixed and kernel_scale > 0) and (fixed or kernel_scale not in KERNEL_SCALES):
        raise ValueError(f"kernel_scale must be a positive float or one of {KERNEL_SCALES}, "
                         f"got {kernel_scale!r}")
    if not init_image_scale > 0 or (init_kernel_scale is not None and not init_kernel_scale > 0):
        raise ValueError("init_image_scale and init_kernel_scale must be positive, got "
                         f"{init_image_scale} and {init_kernel_scale}")


def resolve_kernel_scale(mode, prototype_trace, names, init: Optional[float] = None
                         ) -> Tuple[str, Optional[Tensor], Optional[float]]:
    """``(mode, prior, value)`` for ``kernel_scale=mode``: ``"prior"`` (tied to the common prior
    scale ``prior``), ``"learned"`` (``value``: the initial scale: ``init``, else the prior
    scale, else the prior scales' RMS, else 1) or ``"fixed"`` (``value``: the float given).
    ``"auto"`` ties when the latents share one ``Normal`` prior scale, else learns."""
    prior = isotropic_prior_scale(prototype_trace, names)
    if mode == "prior" and prior is None:
        raise ValueError("kernel_scale='prior' needs every latent to have a Normal prior with "
                         "real support and one common scale; this model's priors differ. Use "
                         "kernel_scale='learned' (or a float).")
    if not isinstance(mode, str):
        return "fixed", None, float(mode)
    mode = ("prior" if prior is not None else "learned") if mode == "auto" else mode
    if mode == "prior":
        return mode, prior, None
    value = init or (None if prior is None else float(prior.detach())) \
        or typical_prior_scale(prototype_trace, names) or 1.0
    return mode, None, float(value)


class TiedPriorScale:
    """The common prior scale ``s`` that ``σ_ker`` is tied to (``kernel_scale="prior"``).

    A constant ``s`` is kept. A ``pyro.param`` ``s`` is read from the param store at each call
    (with its gradient, no model run); with ``module_local_params`` on, a parameter the model
    keeps itself (``PyroParam``, :func:`~pyro_viking.nn.scales.model_param`) is read through
    the ``unconstrained`` reference of its ``param`` site. An ``s`` computed otherwise from
    parameters is read from a model run in training, and its last value serves prediction (no
    model run)."""

    def __init__(self, prior: Tensor, model: Callable, args: tuple, kwargs: dict):
        self.last, self.learnable, self.param_name = prior.detach(), prior.requires_grad, None
        self._local = None  # (weakref to the unconstrained parameter, constraint)
        if self.learnable:
            with torch.random.fork_rng(devices=[]):
                trace = trace_model(model, args, kwargs, {})
            self.param_name = prior_scale_param(trace, prior)
            site = trace.nodes.get(self.param_name, {})
            if pyro.settings.get("module_local_params") and \
                    hasattr(site.get("value"), "unconstrained"):
                self._local = (site["value"].unconstrained, site["kwargs"]["constraint"])

    def value(self, model: Optional[Callable], args: tuple, kwargs: dict, names,
              predicting: bool) -> Tensor:
        """The current ``s`` (``predicting``: no gradient needed)."""
        unconstrained = self._local[0]() if self._local is not None else None
        if self.param_name is not None and self.param_name in pyro.get_param_store():
            s = pyro.param(self.param_name)
        elif unconstrained is not None and pyro.settings.get("module_local_params"):
            s = transform_to(self._local[1])(unconstrained)
        elif not self.learnable or predicting or model is None:
            return self.last
        else:
            with torch.random.fork_rng(devices=[]):
                s = isotropic_prior_scale(trace_model(model, args, kwargs, {}), names)
        self.last = s.detach()
        return s

    def __getstate__(self):
        return {**self.__dict__, "_local": None}  # a weak reference does not pickle
