"""``TraceViking_ELBO``: Monte Carlo likelihood plus a β-scaled closed-form KL.

For each :class:`~pyro_viking.AutoViking` part of the guide,

    loss = −E_q[Σ_obs log p(y | θ)] + β · KL(q ‖ p(θ)),

where the likelihood term is the model's own (plate subsampling rescales it by N/B, so
``beta=1`` is the full-data ELBO) and the KL is read from the model trace at every step (a
learned prior scale gets its gradient): closed form over the latents with ``Normal`` priors on
the real line; a Monte Carlo term ``log q − log p`` for the others (β-scaled too). Sites of other
guides (e.g. in an :class:`~pyro.infer.autoguide.AutoGuideList`) keep the usual Trace_ELBO terms.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuideList
from pyro.infer.util import is_identically_zero, torch_item
from pyro.util import warn_if_nan
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence

from .distributions import KernelImageNormal
from .distributions.kl import cross_entropy_diag_normal
from .priors import gaussian_prior_blocks

__all__ = ["TraceViking_ELBO"]


class TraceViking_ELBO(Trace_ELBO):
    """ELBO with the closed-form, β-scaled KL of :class:`~pyro_viking.AutoViking` guides.

    :param beta: weight of the KL (``1``: the ELBO; ``< 1``: the tempered objective).
    Other arguments are those of :class:`~pyro.infer.Trace_ELBO` (``num_particles``,
    ``vectorize_particles``, ``max_plate_nesting``, ...).
    """

    def __init__(self, beta: float = 1.0, **kwargs):
        if not beta >= 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        super().__init__(**kwargs)
        self.beta = float(beta)

    # -- particles ------------------------------------------------------------------------------
    def _get_traces(self, model, guide, args, kwargs):
        chains = 1 if self.vectorize_particles else self.num_particles
        for part in _viking_parts(guide):
            part.num_chains = chains
        return super()._get_traces(model, guide, args, kwargs)

    # -- the objective --------------------------------------------------------------------------
    def _elbo_particle(self, model_trace, guide_trace) -> Tuple[Tensor, Tensor]:
        """``(elbo, surrogate)`` of one (possibly vectorised) particle."""
        viking_sites, covered = [], set()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and isinstance(site["fn"], KernelImageNormal) \
                    and site["infer"].get("is_auxiliary"):
                viking_sites.append(site)
                covered.add(name)
                covered.update(site["fn"]._guide.layout.names)
        elbo = torch.zeros(())
        surrogate = torch.zeros(())
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and name not in covered:
                elbo = elbo + torch_item(site["log_prob_sum"])
                surrogate = surrogate + site["log_prob_sum"]
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or name in covered:
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            elbo = elbo - torch_item(site["log_prob_sum"])
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                raise NotImplementedError("TraceViking_ELBO supports reparameterised guide "
                                          f"sites only; site '{name}' is not")
        for site in viking_sites:
            kl = self.beta * _kl_term(site, model_trace, guide_trace)
            elbo = elbo - torch_item(kl)
            surrogate = surrogate - kl
        return elbo, surrogate

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo, surrogate = self._elbo_particle(model_trace, guide_trace)
        return -elbo, -surrogate

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Estimate of ``−ELBO`` (β-scaled KL), averaged over ``num_particles``."""
        with torch.no_grad():
            total = 0.0
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                total += -torch_item(self._elbo_particle(model_trace, guide_trace)[0])
            loss = total / self.num_particles
        warn_if_nan(loss, "loss")
        return loss


def _viking_parts(guide) -> List:
    from .autoguide import AutoViking

    if isinstance(guide, AutoViking):
        return [guide]
    if isinstance(guide, AutoGuideList):
        return [g for part in guide for g in _viking_parts(part)]
    return []


def _kl_term(site, model_trace, guide_trace) -> Tensor:
    """``KL(q ‖ p)`` summed over the particle batch; Monte Carlo for non-Gaussian priors."""
    q: KernelImageNormal = site["fn"]
    layout = q._guide.layout
    loc, scale, mask, others = gaussian_prior_blocks(model_trace, layout)
    if not others:
        return kl_divergence(q, Independent(Normal(loc, scale), 1)).sum()
    kl = -q.entropy().sum() + cross_entropy_diag_normal(q, loc, scale, mask).sum()
    for name in others:
        # log p(z) in unconstrained space = log p(x) − log|dz/dx|; the guide's Delta carries
        # log|dz/dx| as its log_density.
        model_site, guide_site = model_trace.nodes[name], guide_trace.nodes[name]
        kl = kl - (model_site["log_prob_sum"] - guide_site["log_prob_sum"])
    return kl
