"""Benchmark 3: FAISS (IVF-Flat, nprobe tuned) against exact brute-force k-NN with scikit-learn's
``NearestNeighbors(algorithm='brute')`` on the same features, in one process.

    python -m bench.retrieval --n 100000 --dim 1024 --out retrieval_100k.json

Features are synthetic but shaped like pooled conv features: a two-level mixture (super-clusters of
clusters of varying spread), ReLU'd and L2-normalised, so L2 ranking = cosine ranking. Queries are
held-out draws from the same mixture. Recall@10 is measured against the brute-force neighbours.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
from sklearn.neighbors import NearestNeighbors

from bench.machine import PeakRSS
from core.atomic_io import atomic_write_json


def clustered_features(
    n: int, dim: int, seed: int = 0, n_super: int = 50, per_super: int = 20
) -> np.ndarray:
    """[n, dim] float32, L2-normalised non-negative vectors from a two-level Gaussian mixture."""
    rng = np.random.default_rng(seed)
    supers = rng.normal(0, 1, (n_super, dim)).astype(np.float32)
    centres = np.repeat(supers, per_super, 0) + rng.normal(
        0, 0.6, (n_super * per_super, dim)
    ).astype(np.float32)
    spread = rng.uniform(0.4, 0.9, n_super * per_super).astype(np.float32)
    weights = rng.dirichlet(np.full(len(centres), 2.0))
    label = rng.choice(len(centres), size=n, p=weights)
    x = centres[label] + spread[label, None] * rng.normal(0, 1, (n, dim)).astype(np.float32)
    np.maximum(x, 0, out=x)
    x += 1e-4  # no all-zero rows (possible in low dimension)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k; found, exact: [Q, k] indices."""
    k = exact.shape[1]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))


def measure_retrieval(n: int, dim: int, queries: int, k: int = 10, target_recall: float = 0.95,
                      nprobes=(1, 2, 4, 8, 16, 32, 64), seed: int = 0) -> dict:  # fmt: skip
    """Build and query times of brute force and FAISS IVF-Flat; the nprobe sweep; peak RSS of each."""
    data = clustered_features(n + queries, dim, seed)
    xb, xq = data[:n], data[n:]
    out: dict = {
        "n": n,
        "dim": dim,
        "queries": queries,
        "k": k,
        "threads": faiss.omp_get_max_threads(),
    }

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        brute = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(xb)
        t1 = time.perf_counter()
        exact = brute.kneighbors(xq, return_distance=False)
        t2 = time.perf_counter()
    out["brute"] = {"build_s": t1 - t0, "query_s": t2 - t1, "queries_per_s": queries / (t2 - t1),
                    "memory": mem.as_dict()}  # fmt: skip
    del brute

    nlist = int(np.sqrt(n))  # sqrt(n) lists: k-means cheap enough to build on 2 cores in seconds
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        train = xb[np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)]
        index.train(train)
        index.add(xb)
        build_s = time.perf_counter() - t0
        sweep = []
        for nprobe in nprobes:
            index.nprobe = nprobe
            t0 = time.perf_counter()
            _, found = index.search(xq, k)
            dt = time.perf_counter() - t0
            sweep.append({"nprobe": nprobe, "query_s": dt, "queries_per_s": queries / dt,
                          "recall_at_k": recall_at_k(found, exact)})  # fmt: skip
            if sweep[-1]["recall_at_k"] >= target_recall:
                break  # larger nprobe only trades speed for recall we no longer need
    good = [s for s in sweep if s["recall_at_k"] >= target_recall]
    best = good[0] if good else sweep[-1]
    out["faiss"] = {"index": f"IVF{nlist},Flat", "nlist": nlist, "build_s": build_s, "sweep": sweep,
                    "chosen": best, "memory": mem.as_dict()}  # fmt: skip
    out["speedup"] = best["queries_per_s"] / out["brute"]["queries_per_s"]
    out["recall_at_k"] = best["recall_at_k"]
    out["target_recall"] = target_recall
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    result = measure_retrieval(args.n, args.dim, args.queries)
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(parse_args())
