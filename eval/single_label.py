"""Single-label protocols on frozen features of any class-subfolder folder: ``python -m eval.single_label``.

    python -m eval.single_label checkpoint=runs/builtin/pretext/context_encoder/seed0 \
        data=path/to/imagenet run_dir=runs/eval/single_label/context_encoder/seed0

``data`` holds ``train/<class>/*`` and ``val/<class>/*`` (ImageNet / Places layout; other split
folders with ``train_split`` / ``val_split``). Per layer of :data:`core.features.LAYERS` (conv1 ...
conv5 average-pooled to about 9k dimensions as the VOC07 SVM, bottleneck flattened):

- **kNN** (``knn``): top-1 / top-5 of a weighted kNN (dinov2 ``eval/knn.py``: cosine similarity,
  k = 20, T = 0.07, FAISS; :func:`eval.knn.knn_topk`), the training images as the database.
- **Linear probe** (``linear``): :mod:`eval.linear`'s parallel heads, one per (layer, lr), SGD with
  momentum; random-resized-crop + flip on train (``linear.augment``; an encoder pass per epoch),
  centre crop on val.

- **Fine-tuning on 1 % / 10 % of the labels** (``protocols=[...,finetune]``, :mod:`eval.finetune`):
  the encoder + a linear head trained end to end on a fixed label subset of train
  (``finetune.fractions``; its image ids in ``parts/finetune<pct>.json``), fixed hyperparameters.

No choice is made on val: a fixed stratified part of ``train_split`` (``holdout``, the same for
every checkpoint) is held out; the kNN layer is the best held-out top-1 with the rest of train as
the database, the probe's lr per layer and its layer the best held-out top-1 of heads trained on the
rest. The reported val numbers use the whole train split as kNN database, and the heads trained on
train minus the held-out part.

Result keys (``result.json``): ``knn_<layer>_top1`` / ``_top5`` (val), ``knn_<layer>_holdout_top1``,
``knn_top1`` / ``knn_top5`` / ``knn_layer`` (1-based index into LAYERS); ``linear_<layer>_top1`` /
``_top5`` (val, the layer's held-out-best lr), ``linear_<layer>_holdout_top1``, ``linear_<layer>_lr``,
``linear_top1`` / ``linear_top5`` / ``linear_layer``; ``finetune<pct>_top1`` / ``_top5`` / ``_n``; ``n_train``, ``n_val``, ``num_classes``,
``extract_s``, ``knn_s``, ``linear_s``, ``time_s``. Features are cached
(:func:`core.features.split_features`); each finished protocol is kept in ``<run_dir>/parts/``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core import run_folder
from core.cli import UserError, run_cli
from core.config import ConfigError, parse_cli
from core.data import to_unit_range
from core.datasets import ImageFolderImages
from core.features import (
    DEFAULT_CACHE_DIR,
    LAYERS,
    TARGET_DIM,
    as_list,
    batch_features,
    identity_key,
    pooling_for,
    split_features,
)
from core.images import ImagesConfig
from core.machine import pick_device
from core.pretrained import Pretrained
from core.splits import folder_class_labels, open_split, split_source
from core.stage_inputs import Input
from eval.finetune import FinetuneConfig, finetune_topk, label_subset
from eval.knn import KNNConfig, knn_topk
from eval.linear import LinearConfig, LinearHeads, fixed_batches, head_scores, train_heads
from eval.metrics import best_layer, topk_accuracy

log = logging.getLogger("eval.single_label")


@dataclass
class Config:
    checkpoint: str = ""  # pretext checkpoint (.pt) or pretext run folder
    data: str = ""  # folder with <train_split>/<class>/ and <val_split>/<class>/
    run_dir: str = "runs/eval/single_label/default"
    seed: int = 0  # the probe's initialisation, batch order and augmentation draws
    train_split: str = "train"
    val_split: str = "val"
    layers: tuple[str, ...] = LAYERS
    target_dim: int = TARGET_DIM  # pooled dimensions aimed at per conv layer (as the SVM)
    holdout: float = 0.1  # part of train_split held out to choose lr and layer (never val)
    protocols: tuple[Literal["knn", "linear", "finetune"], ...] = ("knn", "linear")
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # protocols=[finetune]
    cache_dir: str = DEFAULT_CACHE_DIR
    device: str = "auto"
    batch_size: int = 64  # feature extraction
    num_workers: int = 0  # DataLoader workers of the augmented passes
    images: ImagesConfig = field(default_factory=ImagesConfig)  # the intake rule (core.images)
    force: bool = False


FREE_KEYS = {"force", "num_workers", "device", "cache_dir"}


def check_config(cfg: Config) -> Config:
    bad = [layer for layer in cfg.layers if layer not in LAYERS]
    if bad or not cfg.layers:
        raise ConfigError(
            f"layers: unknown or empty {bad or list(cfg.layers)}; choose from {LAYERS}"
        )
    if not 0 < cfg.holdout < 1:
        raise ConfigError(f"holdout must be in (0, 1), got {cfg.holdout}")
    if not cfg.protocols:
        raise ConfigError("protocols is empty; choose among knn, linear, finetune")
    if cfg.knn.k < 1 or cfg.knn.temperature <= 0:
        raise ConfigError(f"knn.k must be >= 1 and knn.temperature > 0, got {cfg.knn}")
    lin = cfg.linear
    if lin.epochs < 1 or lin.batch_size < 2 or not lin.lrs or min(lin.lrs) <= 0:
        raise ConfigError(f"linear: epochs >= 1, batch_size >= 2, positive lrs; got {lin}")
    ft = cfg.finetune
    if any(not 0 < f <= 1 for f in ft.fractions) or ft.epochs < 1 or ft.lr <= 0:
        raise ConfigError(f"finetune: fractions in (0, 1], epochs >= 1, lr > 0; got {ft}")
    return cfg


def parse_config(argv: list[str] | None = None) -> Config:
    flags = {"checkpoint": "pretext checkpoint (.pt or run folder)",
             "data": "folder with train/<class>/ and val/<class>/"}  # fmt: skip
    return check_config(parse_cli(Config, argv, __doc__, "linear.epochs=5", flags))


# ---- data ---------------------------------------------------------------------------------------


def class_folder(data: str | Path, split: str) -> Path:
    """The folder of ``split`` of ``data``; UserError unless it is a folder of class subfolders."""
    kind, folder = split_source(data, split)
    if kind != "folder":
        raise UserError(f"{folder}: split {split!r} must be a folder of class subfolders")
    return folder


def labelled_images(
    data: str | Path,
    split: str,
    size: int,
    train: bool,
    classes: list[str] | None = None,
    rule: ImagesConfig | None = None,
) -> tuple[ImageFolderImages, np.ndarray, list[str]]:
    """(images, int labels [N], classes): every image under ``<data>/<split>/<class>/``; ``classes``
    (train's) fixes the label of each class name."""
    folder = class_folder(data, split)
    images = open_split(folder, ".", size, train, rule=rule)  # every image under it, sorted
    names = folder_class_labels(images.ids)
    if names is None:
        raise UserError(f"{folder}: images must be in class subfolders (<class>/<image>)")
    classes = classes or sorted(set(names))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise UserError(f"{folder}: classes not in the train split: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    return images, np.array([index[n] for n in names], np.int64), classes


class LabelledRows(Dataset):
    """Rows ``rows`` of ``images`` with their labels: item j = (image, int label)."""

    def __init__(self, images: ImageFolderImages, labels: np.ndarray, rows: np.ndarray):
        self.images, self.labels, self.rows = images, labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[j])
        return self.images[row], int(self.labels[row])


def holdout_rows(
    labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): ``fraction`` of each class's rows (at least one of a class with
    two or more), drawn once from ``seed``: the same split for every checkpoint."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held.extend(rows[:n])
    held = np.sort(np.array(held, np.int64))
    return np.setdiff1d(np.arange(len(labels)), held), held


# ---- protocols ----------------------------------------------------------------------------------


def knn_protocol(
    train: dict[str, np.ndarray], ytr: np.ndarray, val: dict[str, np.ndarray], yval: np.ndarray,
    fit: np.ndarray, held: np.ndarray, num_classes: int, cfg: Config,
) -> dict[str, float]:  # fmt: skip
    """kNN numbers of every layer; the layer chosen by held-out top-1."""
    k, temp = cfg.knn.k, cfg.knn.temperature
    out: dict[str, float] = {}
    for layer in cfg.layers:
        x = train[layer]
        held_acc = knn_topk(x[fit], ytr[fit], x[held], ytr[held], num_classes, k, temp, (1,))
        acc = knn_topk(x, ytr, val[layer], yval, num_classes, k, temp)
        out.update({f"knn_{layer}_holdout_top1": held_acc[1], f"knn_{layer}_top1": acc[1],
                    f"knn_{layer}_top5": acc[5]})  # fmt: skip
    best = best_layer(out, cfg.layers, "knn_{}_holdout_top1")
    out.update(knn_top1=out[f"knn_{best}_top1"], knn_top5=out[f"knn_{best}_top5"],
               knn_layer=float(LAYERS.index(best) + 1))  # fmt: skip
    return out


def linear_protocol(
    model: torch.nn.Module, augmented: ImageFolderImages, train: dict[str, np.ndarray],
    ytr: np.ndarray, val: dict[str, np.ndarray], yval: np.ndarray, fit: np.ndarray,
    held: np.ndarray, num_classes: int, cfg: Config,
) -> dict[str, float]:  # fmt: skip
    """Probe numbers of every layer: parallel heads trained on the fit rows, the lr of each layer
    and the layer chosen by held-out top-1."""
    lin = cfg.linear
    torch.manual_seed(cfg.seed)  # head initialisation and the augmentation draws
    heads = LinearHeads({k: train[k].shape[1] for k in cfg.layers}, num_classes, lin.lrs)
    pooling = pooling_for(model, cfg.target_dim)
    device = pick_device(cfg.device)
    if lin.augment:  # a frozen encoder pass per batch of freshly drawn crops
        pairs = LabelledRows(augmented, ytr, fit)
        loader = DataLoader(pairs, lin.batch_size, shuffle=True, num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip

        def batches(epoch: int):
            model.eval().to(device)
            for images, labels in loader:
                if len(images) < 2:  # BatchNorm needs two rows in train mode
                    continue
                with torch.no_grad():
                    x = to_unit_range(images).to(device)
                    feats = batch_features(model, x, cfg.layers, pooling)
                yield {k: v.float().cpu() for k, v in feats.items()}, labels

        steps = len(loader)
    else:
        batches = fixed_batches({k: v[fit] for k, v in train.items()}, ytr[fit], lin.batch_size,
                                cfg.seed)  # fmt: skip
        steps = math.ceil(len(fit) / lin.batch_size)
    losses = train_heads(heads, batches, steps, lin)
    held_scores = head_scores(heads, {k: v[held] for k, v in train.items()})
    val_scores = head_scores(heads, val)
    out: dict[str, float] = {"linear_loss_last": losses[-1]}
    for layer in cfg.layers:
        held_acc = [topk_accuracy(held_scores[layer, i], ytr[held], (1,))[1]
                    for i in range(len(lin.lrs))]  # fmt: skip
        i = int(np.argmax(held_acc))  # the first lr on ties
        acc = topk_accuracy(val_scores[layer, i], yval)
        out.update({f"linear_{layer}_holdout_top1": held_acc[i], f"linear_{layer}_top1": acc[1],
                    f"linear_{layer}_top5": acc[5], f"linear_{layer}_lr": float(lin.lrs[i])})  # fmt: skip
    best = best_layer(out, cfg.layers, "linear_{}_holdout_top1")
    out.update(linear_top1=out[f"linear_{best}_top1"], linear_top5=out[f"linear_{best}_top5"],
               linear_layer=float(LAYERS.index(best) + 1))  # fmt: skip
    return out


# ---- the stage ----------------------------------------------------------------------------------


def check_data(cfg: Config) -> list[str]:
    """The train classes; both splits must be folders of class subfolders."""
    for split in (cfg.train_split, cfg.val_split):
        class_folder(cfg.data, split)
    return sorted(p.name for p in class_folder(cfg.data, cfg.train_split).iterdir() if p.is_dir())


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight)."""
    return [
        Input("checkpoint", cfg.checkpoint, lambda: Pretrained.load(cfg.checkpoint)),
        Input("data", cfg.data, lambda: check_data(cfg)),
    ]


def main(cfg: Config) -> dict[str, float]:
    """Run (or return the recorded result of) the single-label protocols in ``cfg.run_dir``."""
    cfg = check_config(cfg)
    run_dir = Path(cfg.run_dir)
    pre = Pretrained.load(cfg.checkpoint)
    source = pre.source
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, {"checkpoint": source})
    if done is not None:
        return done
    check_data(cfg)
    model = pre.network().eval()
    size = model.input_size
    pooling = {k: v for k, v in pooling_for(model, cfg.target_dim).items() if k in cfg.layers}
    rule = cfg.images  # the intake's pre-scan of both splits, before anything is written
    train_images, ytr, classes = labelled_images(cfg.data, cfg.train_split, size, False, None, rule)
    val_images, yval, _ = labelled_images(cfg.data, cfg.val_split, size, False, classes, rule)
    meta = {"task": "single_label", "source": source, "seed": cfg.seed, "data": str(cfg.data),
            "classes": classes, "image_size": size, "layers": list(cfg.layers),
            "pooling": {k: as_list(v) for k, v in pooling.items()}}  # fmt: skip
    run_folder.start(run_dir, cfg, meta, {"checkpoint": source})
    t0 = time.perf_counter()
    feats = {}
    for split, images in ((cfg.train_split, train_images), (cfg.val_split, val_images)):
        with torch.no_grad():
            feats[split] = split_features(model, images, cfg.data, split, source["sha256"], pooling,
                                          cfg.cache_dir, cfg.batch_size, pick_device(cfg.device))  # fmt: skip
    train, val = feats[cfg.train_split], feats[cfg.val_split]
    fit, held = holdout_rows(ytr, cfg.holdout)
    result: dict[str, float] = {"extract_s": time.perf_counter() - t0}
    protocol = {"sha256": source["sha256"], "data": str(Path(cfg.data).resolve()),
                "splits": [cfg.train_split, cfg.val_split], "holdout": cfg.holdout,
                "pooling": {k: as_list(v) for k, v in pooling.items()}}  # fmt: skip
    n = len(classes)
    if "knn" in cfg.protocols:
        key = identity_key({**protocol, "knn": asdict(cfg.knn)})

        def knn() -> dict[str, Any]:
            t1 = time.perf_counter()
            out = knn_protocol(train, ytr, val, yval, fit, held, n, cfg)
            return {"result": {**out, "knn_s": time.perf_counter() - t1}}

        result.update(run_folder.resumable_part(run_dir / "parts" / "knn.json", key, knn)["result"])
        log.info("kNN (%s): val top-1 %.4f, top-5 %.4f", LAYERS[int(result["knn_layer"]) - 1],
                 result["knn_top1"], result["knn_top5"])  # fmt: skip
    if "linear" in cfg.protocols:
        key = identity_key({**protocol, "linear": asdict(cfg.linear), "seed": cfg.seed})

        def linear() -> dict[str, Any]:
            t1 = time.perf_counter()
            augmented = open_split(train_images.root, ".", size, True, rule=rule)
            out = linear_protocol(model, augmented, train, ytr, val, yval, fit, held, n, cfg)
            return {"result": {**out, "linear_s": time.perf_counter() - t1}}

        part = run_folder.resumable_part(run_dir / "parts" / "linear.json", key, linear)
        result.update(part["result"])
        log.info("linear probe (%s): val top-1 %.4f, top-5 %.4f",
                 LAYERS[int(result["linear_layer"]) - 1], result["linear_top1"],
                 result["linear_top5"])  # fmt: skip
    if "finetune" in cfg.protocols:
        val_pairs = LabelledRows(val_images, yval, np.arange(len(yval)))
        for fraction in cfg.finetune.fractions:
            name = f"finetune{fraction * 100:g}"
            rows = label_subset(ytr, fraction)
            key = identity_key({**protocol, "finetune": asdict(cfg.finetune), "fraction": fraction,
                                "seed": cfg.seed})  # fmt: skip

            def finetune(name: str = name, rows: np.ndarray = rows) -> dict[str, Any]:
                t1 = time.perf_counter()
                augmented = LabelledRows(
                    open_split(train_images.root, ".", size, True, rule=rule), ytr, rows
                )
                acc = finetune_topk(model.encoder, augmented, val_pairs, n, cfg.finetune, cfg.seed,
                                    pick_device(cfg.device))  # fmt: skip
                out = {f"{name}_top1": acc[1], f"{name}_top5": acc[5], f"{name}_n": float(len(rows)),
                       f"{name}_s": time.perf_counter() - t1}  # fmt: skip
                return {"result": out, "subset": [train_images.ids[i] for i in rows]}

            part = run_folder.resumable_part(run_dir / "parts" / f"{name}.json", key, finetune)
            result.update(part["result"])
            log.info("fine-tuned on %d labels (%s): val top-1 %.4f", len(rows), name,
                     result[f"{name}_top1"])  # fmt: skip
    result.update(train_images.intake("train") | val_images.intake("val"))
    result.update(n_train=float(len(ytr)), n_val=float(len(yval)), num_classes=float(n),
                  time_s=time.perf_counter() - t0)  # fmt: skip
    return run_folder.finish(run_dir, result, {**meta, "elapsed_s": result["time_s"]})


def cli(argv: list[str] | None = None) -> dict[str, float]:
    """User mistakes: one 'error:' line, exit 2 (core.cli.run_cli)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli(lambda: main(parse_config(argv)))


if __name__ == "__main__":
    cli()
