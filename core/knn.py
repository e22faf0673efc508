"""Weighted kNN votes on frozen features (dinov2 ``eval/knn.py``, mmselfsup's kNN), multi-label:
cosine similarity through a FAISS inner-product index (:mod:`core.index`), the k nearest database
rows voting with softmax(sim / T). Shared by the frozen protocols (``eval/frozen.py``,
``eval/knn.py``) and the pretext trainer's online probe (``pretext/probe.py``).
"""

from __future__ import annotations

import numpy as np

from core.features import l2_normalize
from core.index import build_index, search


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
