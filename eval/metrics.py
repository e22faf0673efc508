"""Single-label accuracy (dinov2 ``eval/metrics.py``)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """{k: fraction of rows whose label is among the k highest scores}. scores: [N, C]; labels:
    int [N]. Ties break towards the lower class index (a stable sort), so constant scores are not
    counted as hits by luck; k > C counts every row."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)  # position of the true class
    return {k: float(np.mean(rank < k)) if len(labels) else float("nan") for k in ks}
