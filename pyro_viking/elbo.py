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

import sys
from typing import List, Set, Tuple

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuideList
from pyro.infer.util import is_identically_zero, is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import (
    check_if_enumerated,
    check_model_guide_match,
    check_site_shape,
    warn_if_nan,
)
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence

from .distributions import KernelImageNormal
from .distributions.kl import cross_entropy_diag_normal, kl_kernel_image_normal_isotropic
from .priors import closed_form_prior, gaussian_prior_blocks, isotropic_prior_blocks

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

    def _get_trace(self, model, guide, args, kwargs):
        """As :meth:`Trace_ELBO._get_trace`, but without the log-densities that the closed-form
        KL replaces: the priors of the AutoViking latents with Gaussian priors, and the guide's
        own sites for them (D-sized ``log_prob`` passes that the objective never reads)."""
        if isinstance(poutine.unwrap(guide), Messenger):
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        validate = is_validation_enabled()
        if validate:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        skip = _closed_form_sites(model_trace, guide_trace)
        model_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
        _compute_score_parts(guide_trace, skip)
        if validate:
            for trace in (model_trace, guide_trace):
                for name, site in trace.nodes.items():
                    if site["type"] == "sample" and name not in skip:
                        check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

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


def _closed_form_sites(model_trace, guide_trace) -> Set[str]:
    """Names whose densities the closed-form KL replaces (see ``TraceViking_ELBO._get_trace``)."""
    skip = set()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and isinstance(site["fn"], KernelImageNormal) \
                and site["infer"].get("is_auxiliary"):
            skip.add(name)
            skip.update(n for n in site["fn"]._guide.layout.names
                        if n in model_trace.nodes and closed_form_prior(model_trace.nodes[n]))
    return skip


def _compute_score_parts(trace, skip: Set[str]) -> None:
    """``Trace.compute_score_parts`` for the sample sites not in ``skip``."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in skip or "score_parts" in site:
            continue
        try:
            value = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        except ValueError as e:
            shapes = trace.format_shapes(last_site=name)
            raise ValueError(f"Error while computing score_parts at site '{name}':\n"
                             f"{sys.exc_info()[1]}\n{shapes}") from e
        site["unscaled_log_prob"] = value.log_prob
        value = value.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"] = value
        site["log_prob"] = value.log_prob
        site["log_prob_sum"] = value.log_prob.sum()
        if is_validation_enabled():
            warn_if_nan(site["log_prob_sum"], f"log_prob_sum at site '{name}'")


def _kl_term(site, model_trace, guide_trace) -> Tensor:
    """``KL(q ‖ p)`` summed over the particle batch; Monte Carlo for non-Gaussian priors."""
    q: KernelImageNormal = site["fn"]
    layout = q._guide.layout
    iso = isotropic_prior_blocks(model_trace, layout)
    if iso is not None:  # one scalar prior scale: no D-sized prior vectors
        means, s, batch = iso
        if all(m.requires_grad is False and float(m) == 0.0 for m in means):
            maha = _SquaredNorm.apply(q.loc)
        else:
            maha = sum(((q.loc[..., site.offset:site.offset + site.numel] - m) ** 2).sum(-1)
                       for site, m in zip(layout.sites, means))
        kl = kl_kernel_image_normal_isotropic(q, maha, s)
        return kl.expand(torch.broadcast_shapes(kl.shape, batch)).sum()
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


class _SquaredNorm(torch.autograd.Function):
    """``‖x‖²`` over the last dim, with a one-pass backward ``2 ḡ x`` (``(x ** 2).sum(-1)``
    takes three passes over D in its backward; this runs on every training step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.linalg.vecdot(x, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return x * (2 * grad)[..., None]
