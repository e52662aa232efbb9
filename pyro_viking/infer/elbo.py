"""``TraceViking_ELBO``: Monte Carlo likelihood plus a β-scaled closed-form KL.

For each :class:`~pyro_viking.AutoViking` part of the guide,

    loss = −E_q[Σ_obs log p(y | θ)] + β · KL(q ‖ p(θ)),

where the likelihood term is the model's own (plate subsampling rescales it by N/B, so
``beta=1`` is the full-data ELBO) and the KL is read from the model trace at every step (a
learned prior scale gets its gradient): closed form over the latents with ``Normal`` priors on
the real line; a Monte Carlo term ``log q − log p`` for the others (β-scaled too). Sites of other
guides (e.g. in an :class:`~pyro.infer.autoguide.AutoGuideList`) keep the usual Trace_ELBO terms.

Pyro's own machinery computes everything but the KL: the sites the closed form replaces are
marked while the traces are recorded (a zero log-density, which Pyro's memoised
``compute_log_prob``/``compute_score_parts`` keep), ``Trace_ELBO._differentiable_loss_particle``
sums the rest, and the KL is added. Each VIKING posterior names its latents (``q.layout``).
"""

from __future__ import annotations

from typing import List, Optional, Set

import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuideList
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import warn_if_nan
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence

import pyro_viking.infer.fused_step as fused_step
from pyro_viking.distributions.kl import (
    cross_entropy_diag_normal,
    kl_kernel_image_normal_isotropic,
    squared_norm,
)
from pyro_viking.infer.autoguide.guide import AutoViking
from pyro_viking.infer.autoguide.posteriors import VikingPosterior
from pyro_viking.model_trace.priors import (
    closed_form_prior,
    gaussian_prior_blocks,
    isotropic_prior_blocks,
)
from pyro_viking.nn.bayesian_network import BayesianNetwork

__all__ = ["TraceViking_ELBO", "fused_applies"]


def _is_viking_site(msg) -> bool:
    return msg["type"] == "sample" and isinstance(msg["fn"], VikingPosterior) \
        and msg["infer"].get("is_auxiliary", False)


class _MarkClosedForm(Messenger):
    """Marks the sites whose densities the closed-form KL replaces, so that Pyro's memoised
    ``Trace.compute_log_prob`` / ``compute_score_parts`` skip them: the VIKING joint latent,
    the guide ``Delta`` of each of its real-support latents (log-density 0), and the model
    sites of its latents with a closed-form prior. A mark is a zero ``log_prob`` of the site's
    batch shape (and zero ``ScoreParts`` in the guide)."""

    def __init__(self):
        super().__init__()
        self.covered: Set[str] = set()  # latents of the VIKING posteriors seen in the guide
        self.identity: Set[str] = set()  # ... those with real support

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if _is_viking_site(msg):
            layout = msg["fn"].layout
            self.covered.update(layout.names)
            self.identity.update(s.name for s in layout.sites if s.is_identity)
            self._mark(msg, guide=True)
        elif msg["name"] in self.covered:
            if isinstance(msg["fn"], Delta):
                if msg["name"] in self.identity:
                    self._mark(msg, guide=True)
            elif closed_form_prior(msg):
                self._mark(msg, guide=False)

    @staticmethod
    def _mark(msg, guide: bool) -> None:
        zero = torch.zeros(msg["fn"].batch_shape, device=msg["fn"].mean.device)
        msg["unscaled_log_prob"] = msg["log_prob"] = zero
        msg["log_prob_sum"] = zero.sum()
        if guide:
            msg["score_parts"] = ScoreParts(zero, 0, 0)


class TraceViking_ELBO(Trace_ELBO):
    """ELBO with the closed-form, β-scaled KL of :class:`~pyro_viking.AutoViking` guides.

    :param beta: weight of the KL (``1``: the ELBO; ``< 1``: the tempered objective).
    :param fused: let the training steps of a :class:`~pyro_viking.BayesianNetwork` with an
        :class:`~pyro_viking.AutoViking` guide skip Pyro's traces (the same loss, gradients and
        random numbers without the traces' overhead, which ``benchmarks/README.md`` measures;
        see :mod:`pyro_viking.infer.fused_step` for when it applies). ``False``: always trace.
    Other arguments are those of :class:`~pyro.infer.Trace_ELBO` (``num_particles``,
    ``vectorize_particles``, ``max_plate_nesting``, ...).
    """

    def __init__(self, beta: float = 1.0, fused: bool = True, **kwargs):
        if not beta >= 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        super().__init__(**kwargs)
        self.beta, self.fused = float(beta), bool(fused)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """One training step's loss estimate, with gradients: the fused step where it applies
        (:mod:`pyro_viking.infer.fused_step`), else Pyro's traced one."""
        if self._takes_fused_step(model, guide, args, kwargs):
            return fused_step.fused_loss_and_grads(model, guide, args, beta=self.beta,
                                                   num_particles=self.num_particles)
        return super().loss_and_grads(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """One training step's loss estimate as a differentiable tensor (the ``forward`` of
        ``TraceViking_ELBO(...)(model, guide)``, :mod:`pyro_viking.infer.module`): the fused
        step's loss where it applies, else Pyro's traced one; the gradients of
        :meth:`loss_and_grads`."""
        if self._takes_fused_step(model, guide, args, kwargs):
            return fused_step.fused_loss(model, guide, args, beta=self.beta,
                                         num_particles=self.num_particles)
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def _takes_fused_step(self, model, guide, args: tuple, kwargs: dict) -> bool:
        if not (self.fused and isinstance(model, BayesianNetwork)):
            return False  # every other model: no bookkeeping on its steps
        # The traced step inspects each new call shape (observed values finite and in their
        # support, ...): leave the first step of every shape to it.
        seen = self.__dict__.setdefault("_fused_call_shapes", set())
        shapes = (id(guide),) + tuple((getattr(a, "shape", None), getattr(a, "dtype", None))
                                      for a in args)
        new_shape = shapes not in seen
        seen.add(shapes)
        return not new_shape and fused_applies(self, model, guide, args, kwargs)

    def _get_traces(self, model, guide, args, kwargs):
        chains = 1 if self.vectorize_particles else self.num_particles
        for part in _viking_parts(guide):
            part.num_chains = chains
        return super()._get_traces(model, guide, args, kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        """Pyro's importance trace, with the closed-form sites marked (their log-densities,
        D-sized passes the objective never reads, are not computed)."""
        if isinstance(poutine.unwrap(guide), Messenger):
            return super()._get_trace(model, guide, args, kwargs)
        mark = _MarkClosedForm()
        return super()._get_trace(mark(model), mark(guide), args, kwargs)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        """Pyro's ``Trace_ELBO`` terms (the marked sites contribute zero) plus ``β · KL``."""
        loss, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        for site in guide_trace.nodes.values():
            if _is_viking_site(site):
                kl = _kl_term(site["fn"], model_trace, guide_trace, self.beta)
                loss, surrogate = loss + torch_item(kl), surrogate + kl
        return loss, surrogate

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Estimate of ``−ELBO`` (β-scaled KL), averaged over ``num_particles``."""
        with torch.no_grad():
            total = sum(torch_item(self._differentiable_loss_particle(mt, gt)[0])
                        for mt, gt in self._get_traces(model, guide, args, kwargs))
        loss = total / self.num_particles
        warn_if_nan(loss, "loss")
        return loss


def _only_parameter_capture() -> bool:
    # SVI.step records the params it optimises with poutine.trace(param_only=True); any other
    # handler (scale, condition, block, a plate, ...) could change the step: leave it to Pyro.
    return all(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK)


def _as_defined_by(obj, cls, *methods: str) -> bool:
    """``obj`` is a ``cls`` whose ``methods`` are ``cls``'s own (a subclass may change them)."""
    return isinstance(obj, cls) and all(getattr(type(obj), m) is getattr(cls, m)
                                        for m in methods)


def fused_applies(elbo, model, guide, args: tuple, kwargs: dict) -> bool:
    """Whether :func:`~pyro_viking.infer.fused_step.fused_loss_and_grads` computes exactly the
    traced step for this call (the cases are listed in :mod:`pyro_viking.infer.fused_step`)."""
    return (getattr(elbo, "fused", False)
            and (elbo.num_particles == 1 or elbo.vectorize_particles)
            and _as_defined_by(elbo, TraceViking_ELBO, "_differentiable_loss_particle",
                               "_get_trace", "_get_traces")
            and _as_defined_by(model, BayesianNetwork, "forward", "forward_network",
                               "observation_distribution", "row_log_likelihood", "data_plate")
            and _as_defined_by(guide, AutoViking, "forward", "get_posterior",
                               "training_posterior")
            and guide.prototype_trace is not None
            and guide.master is None and poutine.unwrap(guide.model) is model
            and not guide.grad_through_projection and guide.jacobian == "loss"
            and set(guide.layout.names) == set(model.latent_sites)
            and not kwargs and len(args) == 2 and args[1] is not None
            and _only_parameter_capture())


def _viking_parts(guide) -> List:
    if isinstance(guide, AutoViking):
        return [guide]
    if isinstance(guide, AutoGuideList):
        return [g for part in guide for g in _viking_parts(part)]
    return []


def _kl_term(q: VikingPosterior, model_trace, guide_trace, beta: float) -> Tensor:
    """``β · KL(q ‖ p)`` summed over the particle batch, less what Pyro's terms already hold:
    latents without a closed-form prior keep their Monte Carlo terms ``log p − log q_Delta``
    in the Trace_ELBO sum, which only need the factor ``β − 1`` here."""
    layout = q.layout
    iso = isotropic_prior_blocks(model_trace, layout)
    if iso is not None:  # one scalar prior scale: no D-sized prior vectors
        means, s, batch = iso
        if all(m.requires_grad is False and float(m) == 0.0 for m in means):
            maha = squared_norm(q.loc)
        else:
            maha = sum(((q.loc[..., site.offset:site.offset + site.numel] - m) ** 2).sum(-1)
                       for site, m in zip(layout.sites, means))
        kl = kl_kernel_image_normal_isotropic(q, maha, s)
        return beta * kl.expand(torch.broadcast_shapes(kl.shape, batch)).sum()
    loc, scale, mask, others = gaussian_prior_blocks(model_trace, layout)
    if not others:
        return beta * kl_divergence(q, Independent(Normal(loc, scale), 1)).sum()
    kl = -q.entropy().sum() + cross_entropy_diag_normal(q, loc, scale, mask).sum()
    mc: Optional[Tensor] = None
    for name in others:
        # log p(z) in unconstrained space = log p(x) − log|dz/dx|; the guide's Delta carries
        # log|dz/dx| as its log_density.
        term = guide_trace.nodes[name]["log_prob_sum"] - model_trace.nodes[name]["log_prob_sum"]
        mc = term if mc is None else mc + term
    return beta * kl + (beta - 1.0) * mc
