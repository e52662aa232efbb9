"""Metrics for posterior-predictive classification (optional extra).

Every function takes ``probs``: posterior-predictive samples of class probabilities with shape
``(S, N, C)`` (S posterior samples, N inputs, C classes), as returned by
``pyro.infer.Predictive(model, guide, num_samples=S, return_sites=["probs"])``. A single
deterministic prediction of shape ``(N, C)`` is treated as ``S = 1``. Tensors and numpy arrays
are both accepted; all computations run in float64.

Notation: ``p_s[n, c]`` the probability of class ``c`` for input ``n`` under sample ``s``;
``p̄[n, c] = (1/S) Σ_s p_s[n, c]`` the Bayesian model average (BMA); ``y_n`` the label.

scikit-learn (and matplotlib for :func:`reliability_diagram`) are imported lazily inside the
functions that need them, so importing this module costs nothing extra.
"""

from __future__ import annotations

import torch

__all__ = [
    "bayesian_model_average",
    "classification_metrics",
    "expected_calibration_error",
    "ood_auroc",
    "ood_scores",
    "reliability_diagram",
]


def _probs(probs) -> torch.Tensor:
    p = torch.as_tensor(probs).detach().to(dtype=torch.float64, device="cpu")
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3:
        raise ValueError(f"probs must have shape (S, N, C) or (N, C), got {tuple(p.shape)}")
    return p


def _labels(y, n: int) -> torch.Tensor:
    y = torch.as_tensor(y).detach().to(dtype=torch.long, device="cpu").reshape(-1)
    if y.numel() != n:
        raise ValueError(f"expected {n} labels, got {y.numel()}")
    return y


def bayesian_model_average(probs) -> torch.Tensor:
    """BMA predictive ``p̄[n, c] = (1/S) Σ_s p_s[n, c]``, shape ``(N, C)``, rows renormalised."""
    pbar = _probs(probs).mean(0)
    return pbar / pbar.sum(-1, keepdim=True)


def _calibration_bins(pbar: torch.Tensor, y: torch.Tensor, n_bins: int):
    """Per-bin (count, mean confidence, accuracy) for top-label confidences in equal-width bins
    ``(k/n_bins, (k+1)/n_bins]`` (confidence 0 falls in the first bin)."""
    conf, pred = pbar.max(-1)
    correct = (pred == y).to(torch.float64)
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).to(torch.float64)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    safe = count.clamp(min=1)
    return count, conf_sum / safe, acc_sum / safe


def expected_calibration_error(probs, y, n_bins: int = 15) -> float:
    """Top-label ECE of the BMA predictive with ``n_bins`` equal-width confidence bins:

    ``ECE = Σ_k (|B_k| / N) · |acc(B_k) − conf(B_k)|``

    where ``B_k`` holds the inputs whose top-label confidence ``max_c p̄[n, c]`` lies in
    ``(k/n_bins, (k+1)/n_bins]``, ``acc`` is the fraction of them whose arg-max is the label and
    ``conf`` their mean confidence.
    """
    pbar = bayesian_model_average(probs)
    y = _labels(y, pbar.shape[0])
    count, conf, acc = _calibration_bins(pbar, y, n_bins)
    return float((count / count.sum() * (acc - conf).abs()).sum())


def classification_metrics(probs, y, n_bins: int = 15) -> dict:
    """Accuracy and calibration of posterior-predictive samples ``probs`` (S, N, C).

    Returns a dict with

    - ``accuracy``: ``(1/N) Σ_n 1[argmax_c p̄[n, c] = y_n]`` (of the BMA);
    - ``nll``: NLL of the BMA predictive, ``−(1/N) Σ_n log p̄[n, y_n]``
      (``sklearn.metrics.log_loss``, which clips probabilities to machine epsilon);
    - ``expected_nll``: the VIKING paper's expected NLL, ``−(1/(S N)) Σ_s Σ_n log p_s[n, y_n]``
      (≥ ``nll`` by Jensen; equal when S = 1);
    - ``ece``: top-label expected calibration error of the BMA, see
      :func:`expected_calibration_error`;
    - ``brier``: multi-class Brier score of the BMA, ``(1/N) Σ_n Σ_c (p̄[n, c] − 1[c = y_n])²``
      (``sklearn.metrics.brier_score_loss`` with ``scale_by_half=False``; range [0, 2]).
    """
    from sklearn.metrics import brier_score_loss, log_loss

    p = _probs(probs)
    S, N, C = p.shape
    y = _labels(y, N)
    pbar = bayesian_model_average(p)
    labels = list(range(C))
    tiny = torch.finfo(torch.float64).tiny
    p_true = p.gather(-1, y.expand(S, N).unsqueeze(-1)).squeeze(-1)
    return {
        "accuracy": float((pbar.argmax(-1) == y).to(torch.float64).mean()),
        "nll": float(log_loss(y.numpy(), pbar.numpy(), labels=labels)),
        "expected_nll": float(-p_true.clamp(min=tiny).log().mean()),
        "ece": expected_calibration_error(p, y, n_bins),
        "brier": float(
            brier_score_loss(y.numpy(), pbar.numpy(), labels=labels, scale_by_half=False)
        ),
    }


def ood_scores(probs) -> dict:
    """Per-input out-of-distribution scores (higher = more likely OOD), each of shape (N,):

    - ``entropy``: predictive entropy of the BMA, ``−Σ_c p̄[n, c] log p̄[n, c]`` (0 log 0 = 0);
    - ``max_var``: the VIKING paper's score, ``max_c Var_s(p_s[n, c])``, the largest (over
      classes) population variance ``(1/S) Σ_s (p_s[n, c] − p̄[n, c])²`` of the predicted
      probabilities across posterior samples (identically 0 when S = 1).
    """
    p = _probs(probs)
    pbar = p.mean(0)
    entropy = -torch.special.xlogy(pbar, pbar).sum(-1)
    max_var = p.var(0, correction=0).max(-1).values
    return {"entropy": entropy, "max_var": max_var}


def ood_auroc(score_in, score_out) -> float:
    """Area under the ROC curve for separating OOD (positive class, label 1) from
    in-distribution inputs (label 0) by thresholding a score that is higher for OOD inputs
    (``sklearn.metrics.roc_auc_score``). 0.5 = chance, 1 = perfect separation."""
    from sklearn.metrics import roc_auc_score

    s_in = torch.as_tensor(score_in).detach().to(dtype=torch.float64, device="cpu").reshape(-1)
    s_out = torch.as_tensor(score_out).detach().to(dtype=torch.float64, device="cpu").reshape(-1)
    labels = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)])
    return float(roc_auc_score(labels.numpy(), torch.cat([s_in, s_out]).numpy()))


def reliability_diagram(ax, probs, y, n_bins: int = 15, title: str | None = None):
    """Draw the reliability diagram of the BMA predictive on the matplotlib axes ``ax``.

    Bars show the accuracy of each non-empty confidence bin (same bins as
    :func:`expected_calibration_error`), the dashed diagonal is perfect calibration, red
    segments show the gap to each bin's mean confidence. The ECE is appended to the title.
    Returns ``ax``.
    """
    pbar = bayesian_model_average(probs)
    y = _labels(y, pbar.shape[0])
    count, conf, acc = _calibration_bins(pbar, y, n_bins)
    ece = float((count / count.sum() * (acc - conf).abs()).sum())
    width = 1.0 / n_bins
    left = torch.arange(n_bins, dtype=torch.float64) * width
    nonempty = count > 0
    ax.bar(left[nonempty].numpy(), acc[nonempty].numpy(), width=width, align="edge",
           edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
    ax.vlines(conf[nonempty].numpy(), conf[nonempty].numpy(), acc[nonempty].numpy(),
              colors="tab:red", linewidth=2, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="ideal")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label BMA probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {ece:.3f}" if title is None else f"{title} (ECE = {ece:.3f})")
    ax.legend(loc="upper left", fontsize="x-small")
    return ax

