"""Metrics of one method's predictions (torchmetrics and scikit-learn).

Classification predictions are sampled class probabilities ``probs`` (S, N, C) (S = 1 for a
point estimate); the Bayesian model average (BMA) is their mean over S. Regression predictions
are sampled means ``mean`` (S, N) of a Gaussian likelihood with noise scale ``noise``; the
predictive distribution is the mixture ``(1/S) Σ_s N(mean_s, noise²)``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

Z90 = 1.6448536269514722  # the 95 % standard normal quantile: a central 90 % interval


def _auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of detecting OOD inputs by a higher score (0.5 when the score is constant)."""
    scores = torch.cat([score_in, score_out]).double().numpy()
    labels = [0] * len(score_in) + [1] * len(score_out)
    if float(scores.max() - scores.min()) == 0.0:
        return 0.5
    return float(roc_auc_score(labels, scores))


def classification_scores(probs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """OOD scores per input: entropy of the BMA (nats) and the paper's max-over-classes
    variance of the sampled probabilities (zero for a single network)."""
    pbar = probs.mean(0)
    entropy = -(pbar * pbar.clamp_min(1e-30).log()).sum(-1)
    var = probs.var(0, unbiased=False).max(-1).values if probs.shape[0] > 1 else \
        torch.zeros(probs.shape[1])
    return {"entropy": entropy, "var": var}


def classification_metrics(probs: torch.Tensor, y: torch.Tensor,
                           probs_ood: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Accuracy, BMA NLL, ECE (15 equal-width bins, L1), Brier score (sum over classes of the
    squared error of the BMA, averaged over inputs), and OOD AUROCs (entropy: ``ood_auroc``;
    max-class variance: ``ood_auroc_var``) when ``probs_ood`` is given."""
    probs = probs.double()
    pbar = probs.mean(0)
    c = pbar.shape[-1]
    out = {
        "accuracy": float(MulticlassAccuracy(num_classes=c, average="micro")(pbar, y)),
        "nll": float(-pbar[torch.arange(len(y)), y].clamp_min(1e-300).log().mean()),
        "ece": float(MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1")(
            pbar.float(), y)),
        "brier": float(((pbar - torch.nn.functional.one_hot(y, c)) ** 2).sum(-1).mean()),
    }
    if probs_ood is not None:
        s_in, s_out = classification_scores(probs), classification_scores(probs_ood.double())
        out["ood_auroc"] = _auroc(s_in["entropy"], s_out["entropy"])
        out["ood_auroc_var"] = _auroc(s_in["var"], s_out["var"])
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
        out["ood_auroc"] = _auroc(std, (epi_ood + noise ** 2).sqrt())
        out["ood_auroc_var"] = _auroc(epi, epi_ood)
        if y_ood is not None:
            out["ood_nll"] = float(_mixture_nll(mean_ood, noise, y_ood).mean())
            out["ood_rmse"] = float(((mean_ood.mean(0) - y_ood.double()) ** 2).mean().sqrt())
    return out
