"""Weighted kNN on frozen features (dinov2 ``eval/knn.py``, mmselfsup's kNN): cosine similarity
through a FAISS inner-product index (:mod:`core.index`), k = 20 neighbours voting with
softmax(sim / T), T = 0.07 — multi-label votes (VOC, :func:`core.knn.knn_scores`, shared with the
pretext trainer's probe) and single-label top-k accuracy (:func:`knn_topk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.knn import knn_scores
from eval.metrics import topk_accuracy


@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07


def knn_topk(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    ks: tuple[int, ...] = (1, 5),
) -> dict[int, float]:
    """Single-label kNN top-k accuracy (dinov2 ``eval/knn.py``): each query's class scores are the
    weighted votes of its k nearest database rows (:func:`knn_scores` with one-hot labels; the
    per-query softmax does not change a query's ranking), {k: accuracy}. labels: int [N]."""
    onehot = np.eye(num_classes)[np.asarray(db_labels)]
    scores = knn_scores(db, onehot, queries, k, temperature)
    return topk_accuracy(scores, query_labels, ks)
