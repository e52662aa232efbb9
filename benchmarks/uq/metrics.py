"""Scores of one method's predictions on one split.

Classification predictions are sampled class probabilities ``probs`` (S, N, C) (S = 1 for a
point estimate), scored by the package's metrics (:mod:`pyro_viking.metrics`) on their Bayesian
model average (BMA, the mean over S). Regression predictions are sampled means ``mean`` (S, N)
of a Gaussian likelihood with noise scale ``noise``; the predictive distribution is the mixture
``(1/S) Σ_s N(mean_s, noise²)``: the package has no regression metrics, so they are here.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from pyro_viking.metrics import classification_metrics as bma_classification_metrics
from pyro_viking.metrics import ood_auroc, ood_scores

Z90 = 1.6448536269514722  # the 95 % standard normal quantile: a central 90 % interval
#: what the benchmark reports of :func:`pyro_viking.metrics.classification_metrics`
CLASSIFICATION_KEYS = ("accuracy", "nll", "ece", "brier")


def classification_metrics(probs: torch.Tensor, y: torch.Tensor,
                           probs_ood: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Accuracy, NLL, ECE (15 equal-width bins) and Brier score of the BMA (definitions:
    :func:`pyro_viking.metrics.classification_metrics`), and with ``probs_ood`` the OOD AUROCs
    of the BMA's entropy (``ood_auroc``) and of the max-over-classes variance of the sampled
    probabilities (``ood_auroc_var``; 0.5 for a single network, whose variance is 0)."""
    scores = bma_classification_metrics(probs, y)
    out = {key: scores[key] for key in CLASSIFICATION_KEYS}
    if probs_ood is not None:
        s_in, s_out = ood_scores(probs), ood_scores(probs_ood)
        out["ood_auroc"] = ood_auroc(s_in["entropy"], s_out["entropy"])
        out["ood_auroc_var"] = ood_auroc(s_in["max_var"], s_out["max_var"])
    return out


def _mixture_nll(mean: torch.Tensor, noise: float, y: torch.Tensor) -> torch.Tensor:
    """−log (1/S) Σ_s N(y; mean_s, noise²) per input."""
    logp = torch.distributions.Normal(mean, noise).log_prob(y.double().expand_as(mean))
    return -(torch.logsumexp(logp, 0) - math.log(mean.shape[0]))


def regression_metrics(mean: torch.Tensor, noise: float, y: torch.Tensor,
                       mean_ood: Optional[torch.Tensor] = None,
                       y_ood: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Gaussian-mixture NLL, RMSE of the predictive mean, coverage of the central 90 %
    interval of the moment-matched Gaussian (mean ± 1.645 · total std), and OOD AUROCs of the
    total predictive std (``ood_auroc``) and of the epistemic variance across samples
    (``ood_auroc_var``); with ``y_ood`` also the NLL and RMSE on the OOD inputs."""
    mean = mean.double()
    mu = mean.mean(0)
    epi = mean.var(0, unbiased=False)
    std = (epi + noise ** 2).sqrt()
    y = y.double()
    out = {
        "accuracy": None, "ece": None, "brier": None,
        "nll": float(_mixture_nll(mean, noise, y).mean()),
        "rmse": float(((mu - y) ** 2).mean().sqrt()),
        "coverage90": float(((y - mu).abs() <= Z90 * std).double().mean()),
        "noise_scale": float(noise),
    }
    if mean_ood is not None:
        mean_ood = mean_ood.double()
        epi_ood = mean_ood.var(0, unbiased=False)
        out["ood_auroc"] = ood_auroc(std, (epi_ood + noise ** 2).sqrt())
        out["ood_auroc_var"] = ood_auroc(epi, epi_ood)
        if y_ood is not None:
            out["ood_nll"] = float(_mixture_nll(mean_ood, noise, y_ood).mean())
            out["ood_rmse"] = float(((mean_ood.mean(0) - y_ood.double()) ** 2).mean().sqrt())
    return out
