"""Nearest-neighbour retrieval of encoder features with FAISS, and its quality on VOC or image folders.

    python -m eval.retrieval checkpoints.context_encoder=runs/ce checkpoints.autoencoder=runs/ae \
        checkpoints.random_init=runs/rand data=data/minivoc/VOC2007 run_dir=runs/eval/retrieval

Indexes: :mod:`core.index` (``flat`` exact, the default; ``ivf`` and ``hnsw`` for large sets).

Quality (:func:`retrieval_benchmark`): every image of ``query_split`` (held out) is a query against
``database_split``.

- precision@k: the fraction of the k neighbours that share at least one object class with the
  query (multi-label: classes with a non-difficult object, from the VOC XML), averaged over queries
  that have a class. ``chance/precision`` is the same for a random neighbour (expected value).
  With an image folder (``data``: the folder; ``query_split`` / ``database_split``: subfolders or
  split files, see :func:`core.splits.open_split`) in class subfolders (ImageNet-style), a
  neighbour is relevant when it comes from the query's class folder; a flat folder has no labels,
  so only the recall of the approximate indexes is measured.
- recall@k of an approximate index: |approx top-k ∩ exact top-k| / k, averaged over queries.

Run folder: ``config.yaml``, ``result.json`` (flat keys, see :func:`retrieval_benchmark`; the
intake's counts ``images/{query_split,database_split}/...``, docs/images.md),
``retrieval_grid_<name>.png`` (rows: queries; columns, labelled in the image: query | top-k
neighbours).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from core import run_folder, voc
from core.config import ConfigError, parse_cli
from core.features import DEFAULT_CACHE_DIR, FLAT_LAYERS, l2_normalize
from core.images import ImagesConfig
from core.index import INDEX_KINDS, build_index, search
from core.inpainting import save_grid
from core.pretrained import Pretrained
from core.splits import folder_class_labels, is_voc_root, open_split, split_source
from core.stage_inputs import Input
from eval.features import extract_features

log = logging.getLogger(__name__)

# ---- quality -----------------------------------------------------------------------------------


def image_labels(voc_root: str | Path, ids: list[str]) -> np.ndarray:
    """bool [N, C]: image i has a non-difficult object of class c (VOC classification labels)."""
    names = voc.class_names(voc_root)
    labels = np.zeros((len(ids), len(names)), dtype=bool)
    for row, image_id in enumerate(ids):
        ann = voc.parse_annotation(Path(voc_root) / "Annotations" / f"{image_id}.xml", names)
        for obj in ann.objects:
            if not obj.difficult:
                labels[row, names.index(obj.name)] = True
    return labels


def dataset_labels(data: str | Path, all_ids: list[list[str]], ids: list[str]) -> np.ndarray | None:
    """bool [N, C] labels of ``ids``: VOC classes of a VOC root, or the class subfolder of an
    image folder (classes: the union over ``all_ids``, the query and database splits); None for a
    flat folder (no labels)."""
    if is_voc_root(data) and not any("/" in i for i in ids):
        return image_labels(data, ids)
    names = [folder_class_labels(i) for i in all_ids]
    mine = folder_class_labels(ids)
    if mine is None or any(n is None for n in names):
        return None
    classes = sorted({c for n in names for c in n})  # type: ignore[union-attr]
    out = np.zeros((len(ids), len(classes)), dtype=bool)
    for row, c in enumerate(mine):
        out[row, classes.index(c)] = True
    return out


def precision_at_k(
    neighbours: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray
) -> float:
    """Mean over queries with at least one class of (# of the k neighbours sharing a class) / k.

    neighbours: int [Q, k] rows of ``db_labels``; query_labels: bool [Q, C]; db_labels: bool [N, C].
    """
    neighbours = np.asarray(neighbours)
    if (neighbours < 0).any():
        raise ValueError("neighbour ids contain -1: the index returned fewer than k results")
    shared = (query_labels[:, None, :] & db_labels[neighbours]).any(axis=2)  # [Q, k]
    has_class = query_labels.any(axis=1)
    if not has_class.any():
        return float("nan")
    return float(shared[has_class].mean())


def chance_precision(query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """Expected precision of a uniformly random neighbour (the floor a feature must beat)."""
    has_class = query_labels.any(axis=1)
    shared = (query_labels[has_class].astype(np.int64) @ db_labels.T.astype(np.int64)) > 0
    return float(shared.mean()) if has_class.any() else float("nan")


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx row ∩ exact row| / k (ids [Q, k], -1 ignored)."""
    k = exact.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)


# ---- the benchmark stage -----------------------------------------------------------------------


@dataclass
class Config:
    checkpoints: dict[str, str] = field(default_factory=dict)  # name -> pretext run folder or .pt
    data: str = "data/minivoc/VOC2007"
    run_dir: str = "runs/eval/retrieval"
    seed: int = 0  # unused (retrieval is deterministic); accepted for sweep launchers
    query_split: str = "val"
    database_split: str = "train"
    layers: tuple[str, ...] = ("pool5", "bottleneck")
    ks: tuple[int, ...] = (1, 5, 10)
    normalize: bool = True  # L2-normalise features (cosine ranking)
    metric: Literal["l2", "ip"] = "l2"
    approx: tuple[str, ...] = ("ivf", "hnsw")  # approximate indexes whose recall is measured
    nlist: int = 0  # 0: default_nlist(N)
    nprobe: int = 4
    hnsw_m: int = 16
    ef_search: int = 32
    cache_dir: str = DEFAULT_CACHE_DIR
    device: str = "auto"
    grid_queries: int = 6
    grid_k: int = 8
    images: ImagesConfig = field(default_factory=ImagesConfig)  # the intake rule (core.images)
    force: bool = False  # recompute a finished run folder / reuse one started differently


# Keys that may change between a run and a re-run of its folder (core.run_folder.open_run).
FREE_KEYS = {"force", "device", "cache_dir"}


def check_config(cfg: Config) -> Config:
    if not cfg.checkpoints:
        raise ConfigError("no checkpoints given: set checkpoints.<name>=<run folder or .pt>")
    for name in cfg.checkpoints:
        if "/" in name:
            raise ConfigError(f"checkpoint name {name!r} may not contain '/'")
    bad = [layer for layer in cfg.layers if layer not in FLAT_LAYERS]
    if bad:
        raise ConfigError(f"unknown layer(s) {bad}; choose from {FLAT_LAYERS}")
    bad = [a for a in cfg.approx if a not in INDEX_KINDS or a == "flat"]
    if bad:
        raise ConfigError(f"approx: unknown approximate index kind(s) {bad}; choose from ivf, hnsw")
    if not cfg.ks or min(cfg.ks) < 1:
        raise ConfigError(f"ks must be positive integers, got {cfg.ks}")
    return cfg


def parse_config(argv: list[str] | None = None) -> Config:
    return check_config(parse_cli(Config, argv, __doc__, "checkpoints.ce=runs/ce"))


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight): each checkpoint,
    the query and database splits of ``data``."""
    checks = [
        Input(f"checkpoints.{name}", path, lambda path=path: Pretrained.load(path))
        for name, path in cfg.checkpoints.items()
    ]
    for key in ("query_split", "database_split"):
        split = getattr(cfg, key)
        checks.append(Input("data", cfg.data, lambda split=split: split_source(cfg.data, split)))
    return checks


def retrieval_benchmark(cfg: Config) -> dict[str, float]:
    """Precision@k of each checkpoint's features and recall@k of the approximate indexes.

    Writes ``<run_dir>/result.json`` with flat keys (``<name>`` from ``cfg.checkpoints``):
    ``<name>/<layer>/precision@<k>``, ``<name>/<layer>/<ivf|hnsw>/recall@<k>``,
    ``<name>/<layer>/extract_s`` (feature time, 0 when cached), ``chance/precision``,
    ``n_queries``, ``n_database``, ``time_s``. A finished run folder is returned as is.
    """
    cfg = check_config(cfg)
    run_dir = Path(cfg.run_dir)
    # provenance of every checkpoint read (path, sha256): a re-run from other weights is refused
    pres = {name: Pretrained.load(ckpt) for name, ckpt in cfg.checkpoints.items()}  # read once
    sources = {name: {"path": str(p.path), "sha256": p.sha256} for name, p in pres.items()}
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, sources)
    if done is not None:
        return done
    # the intake's pre-scan of both splits (headers: cheap) at the first checkpoint's input size,
    # before anything is written: a bad file stops the run here, an empty folder stays empty
    size = next(iter(pres.values())).network().input_size
    intake = {}
    for role in ("query_split", "database_split"):
        images = open_split(cfg.data, getattr(cfg, role), size, False, rule=cfg.images)
        intake.update(images.intake(role))
    meta = {"task": "retrieval", "data": str(cfg.data)}
    run_folder.start(run_dir, cfg, meta, sources)
    start = time.perf_counter()
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    kmax = max(cfg.ks)
    result: dict[str, float] = {}
    labels: dict[str, np.ndarray | None] = {}
    for name, pre in pres.items():
        for layer in cfg.layers:
            t0 = time.perf_counter()
            feats = {
                split: extract_features(
                    pre,
                    cfg.data,
                    split,
                    layer,
                    None,
                    cfg.cache_dir,
                    device=device,
                    rule=cfg.images,
                )  # fmt: skip
                for split in (cfg.query_split, cfg.database_split)
            }
            result[f"{name}/{layer}/extract_s"] = time.perf_counter() - t0
            qset, dbset = feats[cfg.query_split], feats[cfg.database_split]
            for split, fs in feats.items():
                if split not in labels:
                    labels[split] = dataset_labels(cfg.data, [qset.ids, dbset.ids], fs.ids)
            q, db = qset.features, dbset.features
            if cfg.normalize:
                q, db = l2_normalize(q), l2_normalize(db)
            exact = build_index(db, "flat", cfg.metric)
            _, exact_ids = search(exact, q, kmax)
            has_labels = labels[cfg.query_split] is not None
            for k in cfg.ks if has_labels else ():  # a flat folder has no labels: recall only
                result[f"{name}/{layer}/precision@{k}"] = precision_at_k(
                    exact_ids[:, :k], labels[cfg.query_split], labels[cfg.database_split]
                )
            for kind in cfg.approx:
                approx = build_index(
                    db, kind, cfg.metric, cfg.nlist or None, cfg.nprobe, cfg.hnsw_m, cfg.ef_search
                )
                _, approx_ids = search(approx, q, kmax)
                for k in cfg.ks:
                    result[f"{name}/{layer}/{kind}/recall@{k}"] = recall_at_k(
                        approx_ids[:, :k], exact_ids[:, :k]
                    )
            if layer == cfg.layers[0] and cfg.grid_queries > 0:
                write_retrieval_grid(
                    run_folder.output_path(run_dir, f"retrieval_grid_{name}.png"), cfg.data,
                    qset, dbset, exact_ids[: cfg.grid_queries, : cfg.grid_k], cfg.images,
                )  # fmt: skip
    if labels[cfg.query_split] is not None:
        result["chance/precision"] = chance_precision(
            labels[cfg.query_split], labels[cfg.database_split]
        )
    else:
        log.info("%s: no class labels (flat folder): precision@k left out", cfg.data)
    result["n_queries"] = float(len(qset.ids))
    result["n_database"] = float(len(dbset.ids))
    result.update(intake)
    result["time_s"] = time.perf_counter() - start
    return run_folder.finish(run_dir, result, meta)


def write_retrieval_grid(
    path: Path,
    voc_root: str,
    qset: Any,
    dbset: Any,
    neighbours: np.ndarray,
    rule: ImagesConfig | None = None,
) -> None:
    """Rows: queries; columns: query | its neighbours (eval views at the model's input size),
    labelled in the image (query, #1 .. #k)."""
    size = qset.identity["data"]["image_size"]
    qimages = open_split(voc_root, qset.identity["data"]["split"], size, False, rule=rule)
    dbimages = open_split(voc_root, dbset.identity["data"]["split"], size, False, rule=rule)
    rows = len(neighbours)
    cols = [torch.stack([qimages[i] for i in range(rows)])]
    for j in range(neighbours.shape[1]):
        cols.append(torch.stack([dbimages[int(neighbours[i, j])] for i in range(rows)]))
    labels = ["query", *(f"#{j + 1}" for j in range(neighbours.shape[1]))]
    save_grid(path, tuple(c.float() / 255 for c in cols), labels=labels)


def main(cfg: Config) -> dict[str, float]:
    return retrieval_benchmark(cfg)


if __name__ == "__main__":
    from core.cli import run_cli

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(run_cli(lambda: main(parse_config())), indent=2))
