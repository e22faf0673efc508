"""Metrics shared by the protocols: single-label top-k accuracy (dinov2 ``eval/metrics.py``) and
the choice of a layer."""

from __future__ import annotations

import math

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """{k: fraction of rows whose label is among the k highest scores}. scores: [N, C]; labels:
    int [N]. Ties break towards the lower class index (a stable sort), so constant scores are not
    counted as hits by luck; k > C counts every row."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)  # position of the true class
    return {k: float(np.mean(rank < k)) if len(labels) else float("nan") for k in ks}


def best_layer(result: dict[str, float], layers: tuple[str, ...], key: str) -> str:
    """The layer with the highest ``result[key.format(layer)]`` (NaN last, earliest on ties)."""
    values = [result[key.format(layer)] for layer in layers]
    return layers[int(np.argmax([v if math.isfinite(v) else -math.inf for v in values]))]
