"""Frozen-feature evaluation of one pretext checkpoint, as the field runs it: ``python -m eval.frozen``.

    python -m eval.frozen checkpoint=runs/builtin/pretext/context_encoder/seed0 \
        data=data/minivoc/VOC2007 run_dir=runs/builtin/eval/frozen/context_encoder/seed0

1. **VOC07 linear SVMs per layer** (:mod:`eval.svm`; Goyal et al. 2019, VISSL) on conv1 ... conv5
   average-pooled to about 9k dimensions (:func:`core.features.pool_spec`) and the bottleneck
   flattened, the cost chosen by cross-validation on ``train_split``, AP on ``test_split`` by the
   VOC07 rules (``core.voc_ap``); **low-shot** SVMs (k positives per class) on the SVM's layer.
2. **kNN** (dinov2 ``eval/knn.py``, mmselfsup's kNN: cosine similarity, k = 20, votes weighted by
   exp(sim / T), T = 0.07) through a FAISS inner-product index. VOC is multi-label, so a query's
   score for class c is the weighted vote of its neighbours that have c, and the result is VOC07 AP
   over those scores (``knn_mAP``), not top-1 accuracy.

No choice is made on test data: the SVM's best layer (``svm_best_*``) is the one with the best mean
cross-validated AP on ``train_split``; kNN's layer (``knn_*``) the one with the best leave-one-out
kNN mAP on ``train_split``. Test numbers of every layer are recorded too (the Zhang et al. 2017
layer plot). Features are extracted once per (checkpoint sha256, data, split, image size, layer,
pooling) and cached (:func:`core.features.split_features`); finished layers are kept in
``<run_dir>/layers/<layer>.json``, so a killed run resumes at the next layer.

Result keys (``result.json``, written atomically and last): ``svm_<layer>_mAP``,
``svm_<layer>_cv_mAP``, ``svm_<layer>_AP_<class>``, ``svm_best_mAP``, ``svm_best_layer`` (1-based
index into conv1..conv5, bottleneck), ``knn_<layer>_mAP``, ``knn_<layer>_loo_mAP``, ``knn_mAP``,
``knn_layer``, ``dim_<layer>``, ``n_train``, ``n_test``, ``extract_s``, ``svm_s``, ``knn_s``,
``time_s``; with ``lowshot.k``: ``lowshot_k<k>_mAP`` / ``lowshot_k<k>_std`` (mean / sample std of the
test mAP over ``lowshot.samples`` samples, on the SVM's layer; a k that cannot be drawn is not
recorded) and ``lowshot_s``. Beside it, ``scores.npz`` (:mod:`core.image_scores`): the test scores
behind every ``svm_*_mAP`` / ``knn_*_mAP`` (not low-shot), for the tables' test-image bootstrap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from core import image_scores, run_folder
from core.atomic_io import atomic_save
from core.cli import run_cli
from core.config import ConfigError, parse_cli
from core.features import (
    DEFAULT_CACHE_DIR,
    LAYERS,
    TARGET_DIM,
    as_list,
    identity_key,
    pooling_for,
    split_features,
)
from core.images import ImagesConfig
from core.knn import knn_scores
from core.machine import pick_device
from core.pretrained import Pretrained
from core.splits import open_split
from core.stage_inputs import Input
from core.voc_ap import mean_ap, voc07_classification_ap
from core.voc_splits import dataset_classes, require_split, voc_root
from eval.knn import KNNConfig
from eval.metrics import best_layer
from eval.svm import LowShotConfig, SVMConfig, lowshot_layer, svm_layer

log = logging.getLogger("eval.frozen")


@dataclass
class Config:
    checkpoint: str = ""  # pretext checkpoint (.pt) or pretext run folder
    data: str = "data/minivoc/VOC2007"  # VOC root
    run_dir: str = "runs/eval/frozen/default"
    seed: int = 0  # unused (deterministic); accepted for sweep launchers
    train_split: str = "trainval"
    test_split: str = "test"
    layers: tuple[str, ...] = LAYERS
    target_dim: int = TARGET_DIM  # pooled dimensions aimed at per conv layer (pool_spec)
    svm: SVMConfig = field(default_factory=SVMConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    lowshot: LowShotConfig = field(default_factory=LowShotConfig)
    ap_mode: Literal["11points", "area"] = "11points"
    cache_dir: str = DEFAULT_CACHE_DIR
    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 2  # joblib workers of the SVM sweep (classes in parallel)
    images: ImagesConfig = field(default_factory=ImagesConfig)  # the intake rule (core.images)
    force: bool = False  # recompute a finished run folder / reuse one started differently


# Keys that may change between a run and a re-run of its folder (core.run_folder.open_run).
FREE_KEYS = {"force", "num_workers", "device", "cache_dir"}


def check_config(cfg: Config) -> Config:
    bad = [layer for layer in cfg.layers if layer not in LAYERS]
    if bad or not cfg.layers:
        raise ConfigError(
            f"layers: unknown or empty {bad or list(cfg.layers)}; choose from {LAYERS}"
        )
    if not cfg.svm.costs or min(cfg.svm.costs) <= 0:
        raise ConfigError(f"svm.costs must be positive numbers, got {cfg.svm.costs}")
    if cfg.svm.folds < 2:
        raise ConfigError(f"svm.folds must be >= 2, got {cfg.svm.folds}")
    if cfg.knn.k < 1 or cfg.knn.temperature <= 0:
        raise ConfigError(f"knn.k must be >= 1 and knn.temperature > 0, got {cfg.knn}")
    if any(k < 1 for k in cfg.lowshot.k) or cfg.lowshot.samples < 1:
        raise ConfigError(f"lowshot.k must be >= 1 and lowshot.samples >= 1, got {cfg.lowshot}")
    if cfg.target_dim < 1:
        raise ConfigError(f"target_dim must be >= 1, got {cfg.target_dim}")
    return cfg


def parse_config(argv: list[str] | None = None) -> Config:
    flags = {"checkpoint": "pretext checkpoint (.pt or run folder)",
             "data": "VOC root, e.g. VOCdevkit/VOC2007"}  # fmt: skip
    return check_config(parse_cli(Config, argv, __doc__, "svm.costs=[0.1,1,10]", flags))


# ---- the stage ----------------------------------------------------------------------------------


def evaluate_layer(
    layer: str,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    classes: tuple[str, ...],
    cfg: Config,
    test_scores: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """SVM and kNN numbers of one layer, and the SVM's chosen cost / CV APs per class.

    train / test: (features [N, D], labels [N, C], difficult_only [N, C]). ``test_scores``, when
    given, receives the test scores [M, C] behind ``svm_<layer>_mAP`` and ``knn_<layer>_mAP``.
    """
    (xtr, ytr, dtr), (xte, yte, dte) = train, test
    out: dict[str, float] = {f"dim_{layer}": float(xtr.shape[1])}
    t0 = time.perf_counter()
    scores, cv_ap, costs = svm_layer(xtr, ytr, xte, cfg.svm, cfg.num_workers)
    test_ap = voc07_classification_ap(scores, yte, dte, cfg.ap_mode)
    test_ap[np.isnan(scores).all(0)] = np.nan  # no training positive: no SVM, no AP
    out[f"svm_{layer}_mAP"] = mean_ap(test_ap)
    best_cv = np.array([np.nanmax(row) if np.isfinite(row).any() else np.nan for row in cv_ap])
    out[f"svm_{layer}_cv_mAP"] = mean_ap(best_cv)
    out.update({f"svm_{layer}_AP_{c}": float(ap) for c, ap in zip(classes, test_ap)})
    out["svm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    k, temp = cfg.knn.k, cfg.knn.temperature
    loo = knn_scores(xtr, ytr * (1 - dtr), xtr, k, temp, exclude_self=True)
    out[f"knn_{layer}_loo_mAP"] = mean_ap(voc07_classification_ap(loo, ytr, dtr, cfg.ap_mode))
    test_knn = knn_scores(xtr, ytr * (1 - dtr), xte, k, temp)
    out[f"knn_{layer}_mAP"] = mean_ap(voc07_classification_ap(test_knn, yte, dte, cfg.ap_mode))
    out["knn_s"] = time.perf_counter() - t0
    if test_scores is not None:
        test_scores.update({f"svm_{layer}_mAP": scores, f"knn_{layer}_mAP": test_knn})
    chosen = {c: {"C": float(cost), "cv_ap": [float(a) for a in row]}
              for c, cost, row in zip(classes, costs, cv_ap)}  # fmt: skip
    return out, {"costs": list(cfg.svm.costs), "classes": chosen}


def check_data(cfg: Config) -> tuple[Path, tuple[str, ...]]:
    """(VOC root, its classes): the root, its class list and its train / test split files."""
    root = voc_root(cfg.data)
    classes = dataset_classes(root, ())
    for split in (cfg.train_split, cfg.test_split):
        require_split(root, split)
    return root, classes


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight)."""
    return [
        Input("checkpoint", cfg.checkpoint, lambda: Pretrained.load(cfg.checkpoint)),
        Input("data", cfg.data, lambda: check_data(cfg)),
    ]


def main(cfg: Config) -> dict[str, float]:
    """Run (or return the recorded result of) the frozen-feature evaluation in ``cfg.run_dir``."""
    cfg = check_config(cfg)
    run_dir = Path(cfg.run_dir)
    pre = Pretrained.load(cfg.checkpoint)
    source = pre.source
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, {"checkpoint": source})
    if done is not None:
        return done
    model = pre.network().eval()
    root, classes = check_data(cfg)
    size = model.input_size
    pooling = pooling_for(model, cfg.target_dim)
    meta = {"task": "frozen", "source": source, "seed": cfg.seed, "data": str(root),
            "classes": list(classes), "image_size": size, "layers": list(cfg.layers),
            "pooling": {k: v for k, v in pooling.items() if k in cfg.layers}}  # fmt: skip
    t0 = time.perf_counter()
    rule, intake = cfg.images, {}
    splits = {}  # the intake's pre-scan of both splits, before anything is written
    for role, split in (("train", cfg.train_split), ("test", cfg.test_split)):
        splits[split] = open_split(
            root, split, size, False, labels=True, fmt="voc", class_names=classes, rule=rule
        )
        intake.update(splits[split].intake(role))
    run_folder.start(run_dir, cfg, meta, {"checkpoint": source})
    data, ids = {}, {}
    layer_pooling = {layer: pooling[layer] for layer in cfg.layers}
    for split, images in splits.items():
        with torch.no_grad():  # not set_grad_enabled(False): main() is called in-process too
            feats = split_features(model, images, root, split, source["sha256"], layer_pooling,
                                   cfg.cache_dir, cfg.batch_size, pick_device(cfg.device))  # fmt: skip
        data[split] = (feats, images.labels.numpy(), images.difficult_only.numpy())
        ids[split] = list(images.ids)
    extract_s = time.perf_counter() - t0
    log.info("features of %s ready in %.1f s", cfg.checkpoint, extract_s)

    result: dict[str, float] = {"extract_s": extract_s, "svm_s": 0.0, "knn_s": 0.0}
    protocol = {"svm": asdict(cfg.svm), "knn": asdict(cfg.knn), "ap_mode": cfg.ap_mode,
                "sha256": source["sha256"], "data": str(root), "target_dim": cfg.target_dim,
                "splits": [cfg.train_split, cfg.test_split]}  # fmt: skip
    test_scores: dict[str, np.ndarray] = {}  # metric -> test scores (core.image_scores)
    for layer in cfg.layers:
        scores_path = run_dir / "layers" / f"{layer}.scores.npz"

        def evaluate(layer: str = layer, scores_path: Path = scores_path) -> dict[str, Any]:
            train = (data[cfg.train_split][0][layer], *data[cfg.train_split][1:])
            test = (data[cfg.test_split][0][layer], *data[cfg.test_split][1:])
            scores: dict[str, np.ndarray] = {}
            numbers, svm = evaluate_layer(layer, train, test, classes, cfg, scores)
            atomic_save(scores_path, lambda fh: np.savez(fh, **scores))  # before its part
            return {"result": numbers, "svm": svm}

        key = identity_key({**protocol, "layer": layer, "pooling": as_list(pooling[layer])})
        part = run_folder.resumable_part(run_dir / "layers" / f"{layer}.json", key, evaluate)
        if scores_path.exists():  # a part finished before scores were recorded has none
            with np.load(scores_path) as saved:
                test_scores.update({k: saved[k] for k in saved.files})
        layer_result = dict(part["result"])
        result["svm_s"] += layer_result.pop("svm_s")
        result["knn_s"] += layer_result.pop("knn_s")
        result.update(layer_result)
        log.info(
            "%s (%d d): SVM test mAP %.4f (cv %.4f), kNN test mAP %.4f (loo %.4f)",
            layer, layer_result[f"dim_{layer}"], layer_result[f"svm_{layer}_mAP"],
            layer_result[f"svm_{layer}_cv_mAP"], layer_result[f"knn_{layer}_mAP"],
            layer_result[f"knn_{layer}_loo_mAP"],
        )  # fmt: skip

    svm_best = best_layer(result, cfg.layers, "svm_{}_cv_mAP")
    knn_best = best_layer(result, cfg.layers, "knn_{}_loo_mAP")
    if cfg.lowshot.k:  # on the SVM's layer (chosen by cross-validation on train_split)
        key = identity_key({**protocol, "layer": svm_best, "lowshot": asdict(cfg.lowshot),
                            "pooling": as_list(pooling[svm_best])})  # fmt: skip

        def lowshot() -> dict[str, Any]:
            t1 = time.perf_counter()
            split = {name: (data[name][0][svm_best], *data[name][1:]) for name in data}
            maps = lowshot_layer(split[cfg.train_split], split[cfg.test_split], cfg.svm,
                                 cfg.lowshot, cfg.ap_mode, cfg.num_workers)  # fmt: skip
            return {"test_mAP": maps, "lowshot_s": time.perf_counter() - t1}

        part = run_folder.resumable_part(run_dir / "layers" / "lowshot.json", key, lowshot)
        result["lowshot_s"] = part["lowshot_s"]
        for k, maps in part["test_mAP"].items():
            values = np.array(maps, np.float64)
            if not np.isfinite(values).all():  # too few positives / negatives for this k
                log.warning("low-shot SVM, k=%s: no sample can be drawn from %s; not recorded",
                            k, cfg.train_split)  # fmt: skip
                continue
            result[f"lowshot_k{k}_mAP"] = float(values.mean())
            result[f"lowshot_k{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            log.info("low-shot SVM (%s), k=%s: test mAP %.4f ± %.4f over %d samples",
                     svm_best, k, result[f"lowshot_k{k}_mAP"], result[f"lowshot_k{k}_std"],
                     len(values))  # fmt: skip
    headline = {
        "svm_best_mAP": result[f"svm_{svm_best}_mAP"],
        "svm_best_layer": float(LAYERS.index(svm_best) + 1),
        "knn_mAP": result[f"knn_{knn_best}_mAP"],
        "knn_layer": float(LAYERS.index(knn_best) + 1),
        "n_train": float(len(data[cfg.train_split][1])),
        "n_test": float(len(data[cfg.test_split][1])),
    }
    result = {**headline, **result, **intake, "time_s": time.perf_counter() - t0}
    aliases = {"svm_best_mAP": f"svm_{svm_best}_mAP", "knn_mAP": f"knn_{knn_best}_mAP"}
    test_scores.update({a: test_scores[k] for a, k in aliases.items() if k in test_scores})
    if test_scores:
        _, labels, difficult = data[cfg.test_split]
        image_scores.save(run_dir, ids[cfg.test_split], labels, difficult, cfg.ap_mode, test_scores)
    log.info("best SVM layer (cv) %s: test mAP %.4f; kNN layer (loo) %s: test mAP %.4f",
             svm_best, headline["svm_best_mAP"], knn_best, headline["knn_mAP"])  # fmt: skip
    meta = {
        **meta,
        "svm_best_layer": svm_best,
        "knn_layer": knn_best,
        "elapsed_s": result["time_s"],
    }
    return run_folder.finish(run_dir, result, meta)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    """User mistakes: one 'error:' line, exit 2 (core.cli.run_cli)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli(lambda: main(parse_config(argv)))


if __name__ == "__main__":
    cli()
