"""Encoder features of a dataset split, computed once and cached on disk (dino's ``--dump_features``).

A feature set is one layer (:data:`core.features.FLAT_LAYERS`: ``pool5``, ``bottleneck``) of a
pretext checkpoint's network, flattened, for every image of a dataset split (a VOC split, a folder
of images or a split file; :func:`split_images`) in the eval view (short side resized to S, centre
crop), computed by :func:`core.features.layer_features` and cached by :func:`core.features.cached`.

With a ``hole`` ([S, S] bool) only the context around it is encoded (hole pixels filled with the
checkpoint's ``data_mean`` as in training, §3.3): the paper's Fig. 8 ("context nearest neighbours").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoint import (
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint_path,
)
from core.cli import UserError
from core.data import ensure_builtin
from core.features import (
    DEFAULT_CACHE_DIR,
    FLAT_LAYERS,
    FeatureSet,
    bottleneck_from_pool5,
    cached,
    dataset_identity,
    feature_identity,
    layer_features,
    pick_device,
)
from core.images import ImagesConfig
from core.models import ContextEncoder

log = logging.getLogger(__name__)


class SplitError(UserError):
    """A split of a data folder that cannot be read (a binary file, a line naming no file)."""


# ---- one call: checkpoint + dataset split -> features -----------------------------------------------


def load_model(checkpoint: str | Path) -> tuple[ContextEncoder, dict[str, Any]]:
    """(network in eval mode, meta {method, arch, data_mean, sha256, config, path})."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).eval()
    path = resolve_checkpoint_path(checkpoint)
    meta = {
        "method": state["method"],
        "arch": state["arch"],
        "data_mean": list(state["data_mean"]),
        "sha256": file_sha256(path),
        "config": state.get("config", {}),
        "path": str(path),
    }
    return model, meta


def voc_images(voc_root: str | Path, split: str, image_size: int, rule: ImagesConfig | None = None):
    """Eval-view images of a VOC split (uint8 [3, S, S] items, ``.ids``, ``.files``)."""
    from core.datasets import VOCImages

    rule = rule or ImagesConfig()
    return VOCImages(voc_root, split, image_size, False, rule.skip_bad, rule.strict)


def is_voc_root(data: str | Path) -> bool:
    return (Path(data) / "JPEGImages").is_dir() and (Path(data) / "ImageSets" / "Main").is_dir()


def split_images(data: str | Path, split: str, image_size: int, rule: ImagesConfig | None = None):
    """Eval-view images (uint8 [3, S, S] items, ``.ids``, ``.files``) of ``split`` of ``data``:

    - a VOC root and a split name: ``ImageSets/Main/<split>.txt`` (ids: VOC image ids);
    - a folder ``<data>/<split>/`` (or ``split`` an absolute folder; ``split`` empty or ``.``: all
      of ``data``): every image under it, flat or in class subfolders (ImageNet ``val/<wnid>/``),
      sorted; ids are paths relative to that folder;
    - a split file ``<data>/<split>`` (or an absolute path): one image per line, a path relative
      to ``data`` (or a VOC id when ``data`` has ``JPEGImages/``); ids are the lines; a line
      naming a missing file is an error naming the split file and the line.

    ``rule``: the intake rule (``images`` section: strict, skip_bad; core.images).
    """
    from core.datasets import ImageFiles, ImageFolderImages

    root = Path(data)
    ensure_builtin(root)  # the built-in mini-VOC is generated on first use
    rule = rule or ImagesConfig()
    kind, target = split_source(root, split)
    if kind == "voc":
        return voc_images(root, split, image_size, rule)
    if kind == "folder":
        return ImageFolderImages(target, image_size, False, rule.skip_bad, rule.strict)
    try:
        text = target.read_text()
    except UnicodeDecodeError:
        raise SplitError(
            f"{target}: not a text split file (split={split!r}: give a subfolder of {root}, "
            "a split file with one image path per line, or '.' for all of it)"
        ) from None
    numbered = [(k, ln.strip()) for k, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not numbered:
        raise FileNotFoundError(f"{target}: split file lists no images")
    jpegs = root / "JPEGImages"
    files = [
        Path(ln) if Path(ln).is_absolute()
        else jpegs / f"{ln}.jpg" if not Path(ln).suffix and jpegs.is_dir()
        else root / ln
        for _, ln in numbered
    ]  # fmt: skip
    missing = [(k, f) for (k, _), f in zip(numbered, files) if not f.is_file()]
    if missing:
        (k, f), more = missing[0], len(missing) - 1
        raise SplitError(
            f"{target}: line {k} names {f}, which is not there"
            + (f" ({more} more lines name missing files)" if more else "")
        )
    images = ImageFiles(files, image_size, False, rule.skip_bad, rule.strict, where=target)
    images.ids = [numbered[k][1] for k in images.keep]
    return images


def split_source(data: str | Path, split: str) -> tuple[str, Path]:
    """Where :func:`split_images` finds ``split`` of ``data``, without reading it: ("voc", root),
    ("folder", folder) or ("file", split file); FileNotFoundError naming what is missing."""
    root = Path(data)
    if root.is_file():
        raise SplitError(f"{root}: data is a file; give a folder of images or a VOC root")
    if is_voc_root(root) and (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return "voc", root
    target = (
        root if split in ("", ".") else Path(split) if Path(split).is_absolute() else root / split
    )
    if target.is_dir():
        return "folder", target
    if target.is_file():
        return "file", target
    if not root.is_dir() and not Path(split).is_absolute():
        raise FileNotFoundError(f"{root}: data folder not found")
    raise FileNotFoundError(
        f"{target}: split {split!r} of {root} not found: expected a folder of images, a split file "
        f"(one image path per line) or a VOC root with ImageSets/Main/{split}.txt"
    )


def folder_class_labels(ids: list[str]) -> list[str] | None:
    """Class of each image of a class-subfolder dataset (the first path component of its id), or
    None when the images are not all in subfolders (a flat folder, a VOC split)."""
    if not ids or not all("/" in i for i in ids):
        return None
    return [i.split("/", 1)[0] for i in ids]


def extract_features(
    checkpoint: str | Path,
    voc_root: str | Path,
    split: str,
    layer: str = "pool5",
    hole: np.ndarray | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rule: ImagesConfig | None = None,
) -> FeatureSet:
    """Features of every image of ``split`` (raw; see :meth:`FeatureSet.normalized`), cached.

    ``voc_root``: a VOC root or a folder of images; ``split`` as in :func:`split_images`;
    ``rule``: the intake rule (a skipped file is absent from the ids and the files' fingerprint)."""
    if layer not in FLAT_LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {FLAT_LAYERS}")
    model, meta = load_model(checkpoint)
    images = split_images(voc_root, split, model.input_size, rule)
    data = dataset_identity(images, voc_root, split)
    identity = feature_identity(meta["sha256"], data, layer, None, hole)

    def compute() -> tuple[np.ndarray, list[str]]:
        if layer == "bottleneck":  # a function of pool5: reuse its cache instead of the images
            pool5 = extract_features(
                checkpoint, voc_root, split, "pool5", hole, cache_dir, batch_size, device, rule
            )
            return bottleneck_from_pool5(model, pool5.features, batch_size), pool5.ids
        log.info("encoding %d images of %s/%s with %s", len(images), voc_root, split, checkpoint)
        feats = layer_features(
            model, images, (layer,), None, hole, meta["data_mean"], batch_size,
            pick_device(str(device)),
        )[layer]  # fmt: skip
        return feats, list(images.ids)

    return cached(cache_dir, identity, compute)
