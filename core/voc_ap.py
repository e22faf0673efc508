"""Average precision for VOC07 multi-label classification (VOC devkit ``VOCevalcls``).

scores, labels, difficult_only: [N, C]. Entries with ``difficult_only[n, c] = 1`` (the image holds
class c only as difficult objects: ``0`` in ``<cls>_test.txt``) are left out of class c's ranking,
as in the devkit. ``mode='11points'`` is the VOC2007 devkit's interpolated AP (mean over recall
thresholds 0, 0.1, ..., 1 of the best precision at recall >= t); ``mode='area'`` is the
non-interpolated area (sklearn's ``average_precision_score``). A class without positives gets NaN
and is left out of the mean.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def average_precision(scores: np.ndarray, positives: np.ndarray, mode: str = "11points") -> float:
    """AP of one ranking. scores: [M] float; positives: [M] bool. NaN when there is no positive."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    if not positives.any():
        return float("nan")
    if mode == "area":
        return float(average_precision_score(positives, scores))
    if mode != "11points":
        raise ValueError(f"mode must be '11points' or 'area', got {mode!r}")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positives[order])
    recall = tp / positives.sum()
    precision = tp / np.arange(1, len(order) + 1)
    ap = 0.0
    for t in np.linspace(0, 1, 11):
        above = precision[recall >= t - 1e-12]
        ap += (above.max() if above.size else 0.0) / 11
    return float(ap)


def voc07_classification_ap(
    scores: np.ndarray, labels: np.ndarray, difficult_only: np.ndarray, mode: str = "11points"
) -> np.ndarray:
    """Per-class AP [C]: class c ranks the images with ``difficult_only[:, c] == 0``."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    keep_all = np.asarray(difficult_only) == 0
    if scores.shape != labels.shape or scores.shape != keep_all.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {scores.shape}, labels {labels.shape}, difficult_only {keep_all.shape}: "
            "expected three [N, C] arrays"
        )
    return np.array(
        [
            average_precision(scores[keep, c], labels[keep, c] > 0.5, mode)
            for c, keep in enumerate(keep_all.T)
        ]
    )


def mean_ap(per_class: np.ndarray) -> float:
    """Mean over the classes that have positives (NaN entries left out)."""
    valid = per_class[~np.isnan(per_class)]
    return float(valid.mean()) if valid.size else float("nan")
