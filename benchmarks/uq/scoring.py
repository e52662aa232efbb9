"""Scoring one fitted method on a task: the test split with the OOD set (one timed prediction
call), a validation split, and the test split under each of the task's distribution shifts."""

from __future__ import annotations

import time
from typing import List, Optional

import torch

from benchmarks.uq.metrics import classification_metrics, regression_metrics
from benchmarks.uq.task_data import Task

#: what each shift strength reports (classification; regression: the regression metrics)
SHIFT_KEYS = ("accuracy", "nll", "ece", "brier", "shift_auroc", "shift_auroc_var")


def predict(fitted, x_parts: List[torch.Tensor]):
    """Predict on the concatenated parts in one call (timed); the samples split back per part
    (each ``(S, N_part, …)``) and the prediction seconds."""
    x = torch.cat(x_parts)
    start = time.perf_counter()
    samples = fitted.sample(x).detach()
    secs = time.perf_counter() - start
    return list(torch.split(samples, [len(p) for p in x_parts], dim=1)), secs


def _metrics(task: Task, fitted, pred, y, pred_ood=None, y_ood=None) -> dict:
    if task.classification:
        return classification_metrics(pred, y, pred_ood)
    return regression_metrics(pred, fitted.noise, y, pred_ood, y_ood)


def score(task: Task, fitted, x_first: torch.Tensor, y_first: torch.Tensor, with_ood: bool):
    """Metrics on ``(x_first, y_first)`` (with the OOD set's AUROCs when ``with_ood``) from one
    prediction call over both; returns (metrics, prediction seconds)."""
    parts, secs = predict(fitted, [x_first, task.x_ood] if with_ood else [x_first])
    ood = parts[1] if with_ood else None
    return _metrics(task, fitted, parts[0], y_first, ood,
                    task.y_ood if with_ood else None), secs


def score_shifts(task: Task, fitted) -> Optional[List[dict]]:
    """The test split under every shift strength of ``task.shifts`` (one untimed prediction
    call over all of them): per strength the test metrics of the shifted inputs, and the
    AUROCs that tell the shifted inputs from the clean test inputs by the BMA's entropy
    (``shift_auroc``) and by the max-over-classes variance (``shift_auroc_var``; for
    regression: total std and epistemic variance). ``None`` for a task without shifts."""
    if not task.shifts:
        return None
    strengths = sorted(set(task.shifts) | {0})
    parts, _ = predict(fitted, [task.shifted(k) for k in strengths])
    clean = parts[strengths.index(0)]
    out = []
    for k, pred in zip(strengths, parts):
        m = _metrics(task, fitted, pred, task.y_test)
        m_ood = _metrics(task, fitted, clean, task.y_test, pred)
        m["shift_auroc"], m["shift_auroc_var"] = m_ood["ood_auroc"], m_ood["ood_auroc_var"]
        out.append({"strength": k, **{key: m.get(key) for key in SHIFT_KEYS if key in m},
                    **({} if task.classification else {"rmse": m["rmse"],
                                                        "coverage90": m["coverage90"]})})
    return [r for r in out if r["strength"] in task.shifts]
