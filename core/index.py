"""The FAISS index shared by retrieval, kNN and nearest-neighbour inpainting.

``flat`` (exact ``IndexFlatL2`` / ``IndexFlatIP``, the default), ``ivf`` (``IndexIVFFlat``:
``nlist`` k-means cells, ``nprobe`` of them searched) and ``hnsw`` (``IndexHNSWFlat``: graph with
``hnsw_m`` links, ``ef_search``) for large sets. Flat and IVF move to the GPU when faiss was built
with GPU support and sees a GPU; HNSW stays on the CPU (faiss has no GPU HNSW).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_KINDS = ("flat", "ivf", "hnsw")
METRICS = ("l2", "ip")


# ---- index -------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """faiss built with GPU support (faiss-gpu) and at least one GPU visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) cells, but at least 39 training points per cell (faiss's own minimum)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def build_index(
    features: np.ndarray,
    kind: str = "flat",
    metric: str = "l2",
    nlist: int | None = None,
    nprobe: int = 8,
    hnsw_m: int = 32,
    ef_search: int = 64,
    gpu: bool | None = None,
) -> faiss.Index:
    """A FAISS index holding ``features`` [N, D] (row i gets id i).

    ``metric``: ``l2`` (search returns squared L2 distances, smallest first) or ``ip`` (inner
    products, largest first; cosine similarity on L2-normalised features). ``gpu``: None = use a GPU
    when :func:`gpu_available`.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {x.shape}")
    n, d = x.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or default_nlist(n)
        quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
        index.nprobe = min(nprobe, nlist)  # faiss's wrapper keeps ``quantizer`` alive
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss_metric)
        index.hnsw.efSearch = ef_search
    use_gpu = gpu_available() if gpu is None else gpu
    if use_gpu and kind != "hnsw":
        if not gpu_available():
            raise RuntimeError("gpu=True but faiss has no GPU support or sees no GPU")
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index._resources = resources
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances [Q, k] float32, ids [Q, k] int64), best first; ids are rows of the indexed set
    (-1 where fewer than k were found)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"queries must be [Q, {index.d}], got shape {q.shape}")
    k = min(k, index.ntotal)
    return index.search(q, k)
