"""The observation model of a Bayesian network: ``p(y_i | f_i)`` for network outputs ``f_i``.

* ``"classification"``: ``Categorical(logits=f)``, outputs ``(..., B, C)``, labels ``(N,)`` long;
* ``"binary"``: ``Bernoulli(logits=f)``, outputs ``(..., B, 1)``, labels ``(N,)`` float;
* ``"regression"``: ``Normal(f, σ²)``, outputs ``(..., B, 1)`` with targets ``(N,)``, or
  ``(..., B, d)`` with targets ``(N, d)`` (the ``d`` outputs of a datum are one event).

Every function here takes the noise scale ``σ`` as a tensor (``None`` unless regression); where
it comes from (fixed or learned) is :mod:`pyro_viking.nn.scales`'s business, and whether the
outputs and labels fit is :mod:`pyro_viking.nn.target_checks`'s.
"""

from __future__ import annotations

from typing import Optional

import pyro.distributions as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LIKELIHOODS", "check_likelihood", "observation_distribution", "output_site",
           "row_log_likelihood"]

LIKELIHOODS = ("classification", "binary", "regression")


def check_likelihood(likelihood: str) -> None:
    """``ValueError`` unless ``likelihood`` is one of :data:`LIKELIHOODS`."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def output_site(likelihood: str) -> str:
    """Name of the deterministic site holding the network output: ``"loc"`` for regression,
    ``"logits"`` otherwise."""
    return "loc" if likelihood == "regression" else "logits"


def observation_distribution(likelihood: str, out: Tensor,
                             noise_scale: Optional[Tensor]) -> dist.TorchDistribution:
    """``p(y_i | f_i)`` for outputs ``out`` ``(..., B, O)``: batch shape ``(..., B)``, one datum
    per batch element; ``ValueError`` for binary outputs with ``O ≠ 1``."""
    if likelihood == "classification":
        return dist.Categorical(logits=out)
    if likelihood == "binary":
        if out.shape[-1] != 1:
            raise ValueError(f"likelihood='binary' needs outputs (B, 1), got "
                             f"{tuple(out.shape)}")
        return dist.Bernoulli(logits=out.squeeze(-1))
    if out.shape[-1] == 1:
        return dist.Normal(out.squeeze(-1), noise_scale)
    return dist.Normal(out, noise_scale).to_event(1)


def row_log_likelihood(likelihood: str, out: Tensor, y: Tensor,
                       noise_scale: Optional[Tensor]) -> Tensor:
    """``log p(y_i | f_i)`` ``(..., B)`` for outputs ``out`` ``(..., B, O)`` and labels/targets
    ``y`` ``(B, ...)``: ``observation_distribution(...).log_prob(y)`` without building a
    distribution for classification and binary labels (one fused cross-entropy kernel)."""
    if likelihood == "classification":
        flat = out.reshape(-1, out.shape[-1])
        labels = y.long().expand(out.shape[:-1]).reshape(-1)
        return -F.cross_entropy(flat, labels, reduction="none").reshape(out.shape[:-1])
    if likelihood == "binary" and out.shape[-1] == 1:
        logits = out.squeeze(-1)
        return -F.binary_cross_entropy_with_logits(logits, y.expand(logits.shape),
                                                   reduction="none")
    return observation_distribution(likelihood, out, noise_scale).log_prob(y)

