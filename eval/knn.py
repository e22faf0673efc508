"""Weighted kNN on frozen features (dinov2 ``eval/knn.py``, mmselfsup's kNN): cosine similarity
through a FAISS inner-product index (:mod:`eval.index`), k = 20 neighbours voting with
softmax(sim / T), T = 0.07 — multi-label votes (VOC, :func:`knn_scores`) and single-label top-k
accuracy (:func:`knn_topk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.features import l2_normalize
from eval.index import build_index, search
from eval.metrics import topk_accuracy


@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07


def knn_scores(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
) -> np.ndarray:
    """Weighted kNN votes [Q, C] (dinov2 / mmselfsup kNN, multi-label).

    Cosine similarity (L2-normalised features, FAISS inner-product index); the k nearest database
    rows vote for their classes with weight softmax(sim / temperature) over the k neighbours
    (dinov2 ``eval/knn.py``). The softmax matters here: VOC AP ranks scores *across* queries, and
    unnormalised exp(sim / T) would rank by how close a query's neighbours are, not by whether
    they have the class. ``exclude_self``: queries are the database rows themselves
    (leave-one-out); each query's own row is dropped.
    """
    db_n, q_n = l2_normalize(db), l2_normalize(queries)
    index = build_index(db_n, "flat", "ip")
    extra = 1 if exclude_self else 0
    sims, ids = search(index, q_n, min(k + extra, len(db_n)))
    if exclude_self:
        keep = ids != np.arange(len(q_n))[:, None]
        keep[keep.sum(1) > k, -1] = False  # own row not found: drop the last instead
        sims = sims[keep].reshape(len(q_n), -1)
        ids = ids[keep].reshape(len(q_n), -1)
    logits = sims.astype(np.float64) / temperature
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)  # [Q, k], softmax over the neighbours
    votes = np.asarray(db_labels, np.float64)[ids]  # [Q, k, C]
    return np.einsum("qk,qkc->qc", weights, votes)


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
