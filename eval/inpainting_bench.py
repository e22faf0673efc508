"""The paper's Table 1: semantic inpainting of a central hole on held-out images.

    python -m eval.inpainting_bench ce_l2=runs/ce_central ce_l2_adv=runs/ce_central_adv \
        data=data/minivoc/VOC2007 run_dir=runs/eval/inpainting

Every held-out image (``split``, eval view at the models' input size S) loses the central hole of
:func:`core.masks.central_mask` (the S/2 square shrunk by ``overlap`` px per side) and is filled by

- ``mean_fill``: the training set's mean colour (the context encoder's own input, §3.3);
- ``nn_hog``: NN-inpainting (Hays & Efros style, §5.1): the training image whose *context* (the image
  with the same hole mean-filled) is nearest in HOG space donates its hole pixels;
- ``nn_ce``: the same with the context encoder's pool5 features of the context ("our features");
- ``telea``: OpenCV's ``cv2.inpaint`` (Telea's fast marching), an outside classical reference;
- ``ce_l2`` / ``ce_l2_adv``: the central-mask context encoder trained with the L2 loss / the joint
  L2 + adversarial loss; its prediction is pasted into the hole (the known context is kept).

Scores (:func:`core.inpainting.region_scores`), pixel values in [0, 1], over two regions of each
method's output image (its fill pasted into the hole, every other pixel the known image, as the
authors' ``test.lua`` pastes its prediction):

- ``hole``: the hole's pixels (the S/2 square shrunk by ``overlap``: what the method had to invent);
- ``center``: the whole central S/2 square (64x64 at 128 px), the overlap band included (its error
  is zero, so ``l2_center = l2_hole * |hole| / |center|``, 0.766 at 128 px / 4 px overlap).

For each: mean L1, mean L2 (per-image and pooled means coincide), PSNR = 10 log10(1 / L2) of each
image averaged over images (``psnr``) and of the pooled L2 (``psnr_pooled``). The paper's Table 1
does not say which; its 18.58 dB with L2 = 1.96 % (10 log10(1/0.0196) = 17.08 dB), both on one
region, fits only PSNR
averaged per image, so that is the main column: ``<method>/l1|l2|psnr`` = the hole, per image.

``data``: a VOC root (``split`` / ``train_split``: ImageSets/Main names) or a folder of images
(Paris StreetView, ImageNet-style class folders): ``split`` / ``train_split`` are subfolders (or
absolute folders) or split files, see :func:`core.splits.open_split`.

Checkpoints: ``ce_l2``, ``ce_l2_adv`` and ``nn_features`` must have a trained decoder (a context
encoder or an autoencoder; ``core.checkpoint.trained_parts``): a supervised, rotation or random-init
checkpoint is refused with one error line. Images go through the intake rule of ``images.*``
(core.images, docs/images.md), checked before the run folder is written.

Run folder: ``config.yaml``; ``result.json`` with flat keys ``<method>/l1``, ``<method>/l2``,
``<method>/psnr``, ``<method>/{l1,l2,psnr,psnr_pooled}_{hole,center}``, ``<method>/time_s`` for
each method run, and ``n_images``, ``overlap``,
``image_size``, ``time_s``, ``images/{split,train_split}/...`` (the intake's counts);
``inpainting_grid.png`` (rows: images; columns, labelled in the image: masked input (hole white) |
each method in :data:`METHODS` order | ground truth) with ``inpainting_grid.json`` naming its
columns and image ids.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage.feature import hog

from core import run_folder
from core.atomic_io import atomic_write_json
from core.config import ConfigError, parse_cli
from core.data import dataset_mean, fill_holes, to_unit_range
from core.features import DEFAULT_CACHE_DIR, l2_normalize, layer_features
from core.images import ImagesConfig
from core.index import build_index, search
from core.inpainting import predict_full, region_scores, save_grid
from core.machine import pick_device
from core.masks import central_mask, central_square
from core.models import ContextEncoder
from core.pretrained import Pretrained
from core.splits import open_split, split_source
from core.stage_inputs import Input
from eval.features import extract_features

log = logging.getLogger(__name__)

NEEDS = {"nn_ce": "nn_features", "ce_l2": "ce_l2", "ce_l2_adv": "ce_l2_adv"}  # method -> key
DEFAULT_SIZE, DEFAULT_OVERLAP = 64, 4
GRID = "inpainting_grid.png"


# ---- the fillers: each returns filled images [N, 3, S, S] in [0, 1] ---------------------------


def unit01(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (the convention of :func:`core.inpainting.evaluate_inpainting`)."""
    return x.add(1).div(2).clamp(0, 1)


def context_of(images: torch.Tensor, hole: np.ndarray, mean: list[float]) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float [N, 3, S, S] in [-1, 1] with the hole filled with ``mean``."""
    holes = torch.from_numpy(hole).expand(len(images), 1, *hole.shape)
    return fill_holes(to_unit_range(images), holes, torch.tensor(mean, dtype=torch.float32))


def mean_fill(images: torch.Tensor, hole: np.ndarray, mean: list[float]) -> torch.Tensor:
    return unit01(context_of(images, hole, mean))


def hog_features(images01: torch.Tensor, cell: int = 8) -> np.ndarray:
    """HOG (9 orientations, ``cell`` px cells, 2x2-cell L2-Hys blocks) of [N, 3, S, S] -> [N, D]."""
    return np.stack(
        [
            hog(
                im.permute(1, 2, 0).numpy(),
                orientations=9,
                pixels_per_cell=(cell, cell),
                cells_per_block=(2, 2),
                channel_axis=-1,
            )
            for im in images01
        ]
    ).astype(np.float32)


def nn_inpaint(
    images: torch.Tensor,
    query_feats: np.ndarray,
    database: torch.Tensor,
    database_feats: np.ndarray,
    hole: np.ndarray,
) -> tuple[torch.Tensor, np.ndarray]:
    """Paste into each image's hole the hole of the database image nearest in feature space.

    images: uint8 [N, 3, S, S]; database: uint8 [M, 3, S, S]; feats: [N, D], [M, D] (exact L2).
    Returns (filled [N, 3, S, S] in [0, 1], nearest database rows [N]).
    """
    _, rows = search(build_index(database_feats, "flat", "l2"), query_feats, 1)
    nearest = rows[:, 0]
    donors = database[torch.from_numpy(nearest)]
    filled = torch.where(torch.from_numpy(hole), donors, images)
    return filled.float() / 255, nearest


def telea_inpaint(images: torch.Tensor, hole: np.ndarray, radius: int = 3) -> torch.Tensor:
    """``cv2.inpaint(..., cv2.INPAINT_TELEA)`` of each uint8 [3, S, S] image -> [N, 3, S, S] in [0, 1]."""
    mask = hole.astype(np.uint8) * 255
    out = []
    for im in images:
        known = np.ascontiguousarray(im.permute(1, 2, 0).numpy()).copy()
        known[hole] = 0  # the hole's true pixels never reach the method
        out.append(cv2.inpaint(known, mask, radius, cv2.INPAINT_TELEA))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def ce_inpaint(
    model: ContextEncoder,
    images: torch.Tensor,
    hole: np.ndarray,
    mean: list[float],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The context encoder's prediction pasted into the hole (context kept) -> [N, 3, S, S] in [0, 1]."""
    model.eval().to(device)
    hole_t = torch.from_numpy(hole)
    out = []
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i : i + batch_size])
        context = context_of(images[i : i + batch_size], hole, mean)
        pred = predict_full(model, context.to(device)).float().cpu()
        out.append(unit01(torch.where(hole_t, pred, x)))
    return torch.cat(out)


# ---- the stage ---------------------------------------------------------------------------------


@dataclass
class Config:
    data: str = "data/minivoc/VOC2007"
    run_dir: str = "runs/eval/inpainting"
    seed: int = 0  # unused (every method is deterministic); accepted for sweep launchers
    split: str = "test"  # held-out images: a VOC split, a subfolder of data or a split file
    train_split: str = "train"  # NN-inpainting's donors and the mean colour's source (same forms)
    ce_l2: str = ""  # central-mask context encoder, L2 loss (pretext run folder or .pt)
    ce_l2_adv: str = ""  # central-mask context encoder, L2 + adversarial loss
    nn_features: str = ""  # checkpoint whose pool5 features drive nn_ce ("": ce_l2)
    methods: tuple[str, ...] = ()  # (): every method whose checkpoint is given
    image_size: int = 0  # 0: the checkpoints' input size (64 without checkpoints)
    overlap: int = -1  # -1: the ce_l2 checkpoint's mask.overlap (4 without one)
    max_images: int = 250
    telea_radius: int = 3
    hog_cell: int = 8
    grid_rows: int = 6
    batch_size: int = 64
    cache_dir: str = DEFAULT_CACHE_DIR
    device: str = "auto"
    images: ImagesConfig = field(default_factory=ImagesConfig)  # the intake rule (core.images)
    force: bool = False  # recompute a finished run folder / reuse one started differently


# Keys that may change between a run and a re-run of its folder (core.run_folder.open_run).
FREE_KEYS = {"force", "device", "cache_dir"}


# ---- the methods: one fill function each, over what the bench has read ------------------------


@dataclass
class Bench:
    """What the fill methods read: the held-out images (uint8 [N, 3, S, S]; ``truth``: in [0, 1]),
    their ids and intake counts, the hole, the fill mean, the donors (uint8 [M, 3, S, S] or None,
    NN-inpainting) and the loaded checkpoints (key -> (model, meta))."""

    cfg: Config
    images: torch.Tensor
    truth: torch.Tensor
    ids: list[str]
    intake: dict[str, float]
    hole: np.ndarray
    mean: list[float]
    database: torch.Tensor | None
    models: dict[str, tuple[ContextEncoder, Pretrained]]
    device: torch.device


def fill_mean(b: Bench) -> torch.Tensor:
    return mean_fill(b.images, b.hole, b.mean)


def fill_nn_hog(b: Bench) -> torch.Tensor:
    qf = hog_features(mean_fill(b.images, b.hole, b.mean), b.cfg.hog_cell)
    dbf = hog_features(mean_fill(b.database, b.hole, b.mean), b.cfg.hog_cell)
    return nn_inpaint(b.images, qf, b.database, dbf, b.hole)[0]


def fill_nn_ce(b: Bench) -> torch.Tensor:
    cfg = b.cfg
    model, pre = b.models["nn_features"]
    qf = layer_features(
        model, b.images, ("pool5",), None, b.hole, pre.data_mean, cfg.batch_size, b.device
    )["pool5"]
    db = extract_features(
        pre, cfg.data, cfg.train_split, "pool5", b.hole, cfg.cache_dir,
        cfg.batch_size, b.device, cfg.images,
    )  # fmt: skip
    return nn_inpaint(b.images, l2_normalize(qf), b.database, l2_normalize(db.features), b.hole)[0]


def fill_telea(b: Bench) -> torch.Tensor:
    return telea_inpaint(b.images, b.hole, b.cfg.telea_radius)


def fill_ce(b: Bench, key: str) -> torch.Tensor:
    model, pre = b.models[key]
    return ce_inpaint(model, b.images, b.hole, pre.data_mean, b.cfg.batch_size, b.device)


# method -> its fill function, in the grid's column order
FILLS = {
    "mean_fill": fill_mean,
    "nn_hog": fill_nn_hog,
    "nn_ce": fill_nn_ce,
    "telea": fill_telea,
    "ce_l2": partial(fill_ce, key="ce_l2"),
    "ce_l2_adv": partial(fill_ce, key="ce_l2_adv"),
}
METHODS = tuple(FILLS)


def resolve(cfg: Config) -> Config:
    """Fill ``nn_features`` and ``methods``; check that every method has what it needs."""
    if not cfg.nn_features and cfg.ce_l2:
        cfg.nn_features = cfg.ce_l2
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods: unknown method(s) {unknown}; choose from {METHODS}")
    if not cfg.methods:
        cfg.methods = tuple(m for m in METHODS if getattr(cfg, NEEDS.get(m, "data")) != "")
    for m in cfg.methods:
        if m in NEEDS and not getattr(cfg, NEEDS[m]):
            raise ConfigError(f"method {m} needs a checkpoint: set {NEEDS[m]}=<run folder or .pt>")
    return cfg


def table1_model(cfg: Config, key: str) -> tuple[ContextEncoder, Pretrained]:
    """(network in eval mode, checkpoint) of ``key`` (ce_l2, ce_l2_adv, nn_features), refused
    unless its decoder was trained: a supervised or rotation encoder's decoder is random."""
    pre = Pretrained.load(getattr(cfg, key))
    pre.require_trained("decoder", f"{key} (Table 1)")
    return pre.network().eval(), pre


def parse_config(argv: list[str] | None = None) -> Config:
    return resolve(parse_cli(Config, argv, __doc__, "ce_l2=runs/ce_central"))


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight): the checkpoints of
    the methods run, the held-out split and, where a method reads it, the training split."""
    cfg = resolve(cfg)
    checks = [Input(k, getattr(cfg, k), lambda k=k: table1_model(cfg, k)) for k in table1_keys(cfg)]
    splits = ["split"]
    if "ce_l2" not in cfg.methods or {"nn_hog", "nn_ce"} & set(cfg.methods):  # the mean, donors
        splits.append("train_split")
    for key in splits:
        split = getattr(cfg, key)
        checks.append(Input("data", cfg.data, lambda split=split: split_source(cfg.data, split)))
    return checks


def stack(images: Any, n: int | None = None) -> torch.Tensor:
    """The first ``n`` items of an image dataset as one uint8 tensor [n, 3, S, S]."""
    n = len(images) if n is None else min(n, len(images))
    return torch.stack([images[i] for i in range(n)])


# ---- the steps of main ------------------------------------------------------------------------


def table1_keys(cfg: Config) -> list[str]:
    """The checkpoint keys the methods of ``cfg`` read (ce_l2, ce_l2_adv, nn_features)."""
    keys = [m for m in ("ce_l2", "ce_l2_adv") if m in cfg.methods]
    return keys + (["nn_features"] if "nn_ce" in cfg.methods else [])


def input_size(cfg: Config, models: dict[str, tuple[ContextEncoder, Pretrained]]) -> int:
    """``image_size``, else the checkpoints' one input size (DEFAULT_SIZE without checkpoints)."""
    sizes = {m.input_size for m, _ in models.values()}
    if len(sizes) > 1 or (cfg.image_size and sizes and cfg.image_size not in sizes):
        raise ConfigError(
            f"checkpoints take different input sizes {sorted(sizes)} (image_size={cfg.image_size})"
        )
    return cfg.image_size or (sizes.pop() if sizes else DEFAULT_SIZE)


def trained_overlap(models: dict[str, tuple[ContextEncoder, Pretrained]]) -> int:
    """The ce_l2 (else ce_l2_adv) checkpoint's mask.overlap; DEFAULT_OVERLAP without one."""
    ref = models.get("ce_l2") or models.get("ce_l2_adv")
    return ref[1].config.get("mask", {}).get("overlap", DEFAULT_OVERLAP) if ref else DEFAULT_OVERLAP


def score_regions(size: int, hole: np.ndarray) -> dict[str, torch.Tensor]:
    """The regions scored: the hole, and the whole central S/2 square (overlap band included)."""
    lo, hi = central_square(size)
    center = torch.zeros(size, size, dtype=torch.bool)
    center[lo:hi, lo:hi] = True
    return {"hole": torch.from_numpy(hole), "center": center}


def read_bench(cfg: Config, size: int, models: dict, device: torch.device) -> Bench:
    """The held-out images, their hole, the fill mean and (NN-inpainting) the donor images."""
    hole = central_mask(size, cfg.overlap)
    test_set = open_split(cfg.data, cfg.split, size, False, rule=cfg.images)
    intake = test_set.intake("split")
    images = stack(test_set, cfg.max_images)
    needs_db = {"nn_hog", "nn_ce"} & set(cfg.methods)
    train_set = None
    if "ce_l2" not in models or needs_db:  # the mean's source, NN-inpainting's donors
        train_set = open_split(cfg.data, cfg.train_split, size, False, rule=cfg.images)
        intake.update(train_set.intake("train_split"))
    # the mean the context encoder was trained with (§3.3), else the training split's
    mean = models["ce_l2"][1].data_mean if "ce_l2" in models else dataset_mean(train_set)
    database = stack(train_set) if needs_db else None
    ids = test_set.ids[: len(images)]
    return Bench(
        cfg, images, images.float() / 255, ids, intake, hole, mean, database, models, device
    )


def method_scores(method: str, filled: torch.Tensor, truth: torch.Tensor, regions: dict) -> dict:
    """``<method>/{l1,l2,psnr,psnr_pooled}_{hole,center}`` and the main columns ``<method>/l1|l2|psnr``."""
    result = {}
    for name, region in regions.items():
        for key, value in region_scores(filled, truth, region).items():
            result[f"{method}/{key}_{name}"] = value
    for key in ("l1", "l2", "psnr"):  # the main columns: the hole, per-image averaging
        result[f"{method}/{key}"] = result[f"{method}/{key}_hole"]
    return result


def write_grid(run_dir: Path, b: Bench, filled: dict[str, torch.Tensor], rows: int) -> None:
    """inpainting_grid.png (masked input | each method | truth) and inpainting_grid.json."""
    rows = min(rows, len(b.images))
    if not rows:
        return
    masked = b.truth[:rows].clone()
    masked[:, :, torch.from_numpy(b.hole)] = 1.0  # the hole in white
    columns = [masked, *(filled[m][:rows] for m in b.cfg.methods), b.truth[:rows]]
    names = ["masked_input", *b.cfg.methods, "truth"]
    save_grid(run_folder.output_path(run_dir, GRID), tuple(columns), labels=names)
    atomic_write_json(
        run_folder.output_path(run_dir, "inpainting_grid.json"),
        {"columns": names, "ids": b.ids[:rows]},
    )


def main(cfg: Config) -> dict[str, float]:
    """Table 1 on ``cfg.split``; returns (and writes to result.json) the flat metrics."""
    cfg = resolve(cfg)
    run_dir = Path(cfg.run_dir)
    start = time.perf_counter()
    device = pick_device(cfg.device)
    models = {key: table1_model(cfg, key) for key in table1_keys(cfg)}
    size = input_size(cfg, models)
    if cfg.overlap < 0:
        cfg.overlap = trained_overlap(models)
    # provenance of every checkpoint read (path, sha256): a re-run from other weights is refused
    sources = {name: {"path": str(p.path), "sha256": p.sha256} for name, (_, p) in models.items()}
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, sources)
    if done is not None:
        return done
    b = read_bench(cfg, size, models, device)
    run_meta = {"task": "inpainting_bench", "data": str(cfg.data), "image_size": size}
    run_folder.start(run_dir, cfg, run_meta, sources)

    regions = score_regions(size, b.hole)
    filled: dict[str, torch.Tensor] = {}
    result: dict[str, float] = {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        filled[method] = FILLS[method](b)
        result.update(method_scores(method, filled[method], b.truth, regions))
        result[f"{method}/time_s"] = time.perf_counter() - t0
        log.info(
            "%s: %s", method, {k: round(v, 4) for k, v in result.items() if k.startswith(method)}
        )
    result.update(n_images=float(len(b.images)), overlap=float(cfg.overlap), image_size=float(size))
    result.update(b.intake)
    result["time_s"] = time.perf_counter() - start
    write_grid(run_dir, b, filled, cfg.grid_rows)
    return run_folder.finish(run_dir, result, run_meta)


if __name__ == "__main__":
    from core.cli import run_cli

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(run_cli(lambda: main(parse_config())), indent=2))
