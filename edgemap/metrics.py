"""Classification metrics on numpy arrays only (no torch, no scikit-learn).

The device wheel may vendor this module, so it imports numpy alone. Conventions match
scikit-learn's defaults: macro averages run over the classes that occur in the labels or
the predictions, and a class with no predictions has precision 0 (``zero_division=0``).

Example:
    >>> y = np.array([0, 0, 1, 2]); p = np.array([0, 1, 1, 2])
    >>> accuracy(y, p)
    0.75
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def score_text(value: float, digits: int, top: float) -> str:
    """``value`` with ``digits`` decimals, never rounded up to ``top`` (a perfect score) when it falls short of it:
    1 error in 30,000 is 99.99 %, not 100.00 %; an F1 of 0.99997 is 0.9999, not 1.0000."""
    text = f"{value:.{digits}f}"
    if value < top and float(text) >= top:
        text = f"{math.floor(value * 10**digits) / 10**digits:.{digits}f}"
    return text


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise ValueError(f"{name} must hold non-negative integer class indices")
    return y.astype(np.int64, copy=False)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    if t.size and max(t.max(), p.max()) >= num_classes:
        raise ValueError(f"a class index is >= num_classes ({num_classes})")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches (0.0 for an empty set)."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    return float((t == p).mean()) if t.size else 0.0


def topk_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Ties are broken by the lower class index, like ``argmax``.
    """
    t = _labels(y_true, "y_true")
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != t.size:
        raise ValueError(f"scores must be (N, C) with N={t.size}, got {scores.shape}")
    if not t.size:
        return 0.0
    k = min(k, scores.shape[1])
    # stable argsort on -scores: equal scores keep index order (as argmax does)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == t[:, None]).any(axis=1).mean())


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of samples on which two predictors pick the same class."""
    a, b = _labels(pred_a, "pred_a"), _labels(pred_b, "pred_b")
    if a.shape != b.shape:
        raise ValueError(f"predictions differ in length ({a.size} vs {b.size})")
    return float((a == b).mean()) if a.size else 0.0


def per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return precision, recall, f1, support.astype(np.int64)


def macro(cm: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall, F1 over the classes present in labels or predictions."""
    cm = np.asarray(cm)
    precision, recall, f1, support = per_class(cm)
    present = (support > 0) | (cm.sum(axis=0) > 0)
    if not present.any():
        return 0.0, 0.0, 0.0
    return float(precision[present].mean()), float(recall[present].mean()), float(f1[present].mean())


@dataclass
class ClassificationReport:
    """Everything ``edgemap eval`` reports for one predictor."""

    n: int
    accuracy: float
    top5: float | None
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)


def classification_report(y_true: np.ndarray, scores: np.ndarray, classes: list[str]) -> ClassificationReport:
    """Accuracy, top-5 (only with more than 5 classes), macro P/R/F1, per-class rows and confusion.

    Example:
        >>> r = classification_report(np.array([0, 1]), np.array([[2.0, 1.0], [3.0, 0.0]]), ["a", "b"])
        >>> r.accuracy, r.confusion
        (0.5, [[1, 0], [1, 0]])
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"scores must be (N, {len(classes)}), got {scores.shape}")
    t = _labels(y_true, "y_true")
    pred = scores.argmax(axis=1) if t.size else np.zeros(0, np.int64)
    cm = confusion_matrix(t, pred, len(classes))
    p, r, f, s = per_class(cm)
    mp, mr, mf = macro(cm)
    rows = [
        {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    ]
    return ClassificationReport(
        n=int(t.size),
        accuracy=accuracy(t, pred),
        top5=topk_accuracy(t, scores, 5) if len(classes) > 5 else None,
        macro_precision=mp,
        macro_recall=mr,
        macro_f1=mf,
        per_class=rows,
        confusion=cm.tolist(),
    )
