"""Encoder features of a dataset split, computed once and cached on disk (dino's ``--dump_features``).

A feature set is the flattened output of one layer of a pretext checkpoint's network for every image
of a dataset split (a VOC split, a folder of images or a split file; :func:`split_images`) (eval view: short side resized to S, centre crop), hole pixels (if any) filled with the
checkpoint's ``data_mean`` as in training (§3.3):

- ``pool5``: the encoder output [N, C, n, n] -> [N, C*n*n]
- ``bottleneck``: the channel-wise FC (or the 4000-d FC of inpaint128) on top of it, flattened

With a ``hole`` ([S, S] bool) only the context around it is encoded: the paper's Fig. 8 ("context
nearest neighbours"), where the patch is removed and its surroundings are compared.

Cache layout (``cache_dir``): ``<layer>-<split>-<key>.npy`` (float32 [N, D], raw, not normalised)
and ``<layer>-<split>-<key>.json`` ({"ids": [...], "identity": {...}, "shape": [N, D]}), written
atomically, the JSON last (it marks the pair complete). ``key`` hashes the identity: the checkpoint
file's sha256, the dataset (resolved root, split, image size, a fingerprint of its files' sizes and
mtimes), the layer and the hole, so a retrained checkpoint or regenerated data gets new features.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.atomic_io import atomic_save, atomic_write_json
from core.checkpoint import (
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint_path,
)
from core.cli import UserError
from core.data import ensure_builtin, fill_holes, to_unit_range
from core.images import ImagesConfig
from core.models import ContextEncoder

log = logging.getLogger(__name__)

LAYERS = ("pool5", "bottleneck")
CACHE_FORMAT = 1  # bump when the way features are computed changes
DEFAULT_CACHE_DIR = "runs/cache/features"


class SplitError(UserError):
    """A split of a data folder that cannot be read (a binary file, a line naming no file)."""


@dataclass
class FeatureSet:
    """``features``: float32 [N, D]; ``ids``: the N image ids; ``identity``: what they depend on."""

    features: np.ndarray
    ids: list[str]
    identity: dict[str, Any]

    def normalized(self) -> np.ndarray:
        return l2_normalize(self.features)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero). x: [N, D] -> float32 [N, D]."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def encode_images(
    model: ContextEncoder,
    images: Dataset | torch.Tensor,
    data_mean: list[float],
    layer: str = "pool5",
    hole: np.ndarray | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Flattened ``layer`` features of uint8 images [N, 3, S, S] -> float32 [N, D].

    ``hole`` ([S, S] bool): those pixels are replaced by ``data_mean`` before encoding.
    """
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {LAYERS}")
    model.eval().to(device)
    mean = torch.tensor(data_mean, dtype=torch.float32)
    size = model.input_size
    hole_t = None if hole is None else torch.as_tensor(np.asarray(hole, dtype=bool))
    if hole_t is not None and hole_t.shape != (size, size):
        raise ValueError(f"hole has shape {tuple(hole_t.shape)}, expected ({size}, {size})")
    out = []
    for batch in DataLoader(images, batch_size=batch_size):  # type: ignore[arg-type]
        if isinstance(batch, (list, tuple)):  # datasets that also return labels
            batch = batch[0]
        if batch.shape[-1] != size:
            raise ValueError(f"images are {batch.shape[-1]} px, the model takes {size} px")
        x = to_unit_range(batch)
        if hole_t is not None:
            x = fill_holes(x, hole_t.expand(len(x), 1, size, size), mean)
        feats = model.forward_encoder(x.to(device))
        if layer == "bottleneck":
            feats = model.forward_bottleneck(feats)
        out.append(feats.flatten(1).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


# ---- cache ------------------------------------------------------------------------------------


def identity_key(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def hole_digest(hole: np.ndarray | None) -> str | None:
    if hole is None:
        return None
    hole = np.asarray(hole, dtype=bool)
    return hashlib.sha256(np.packbits(hole).tobytes() + str(hole.shape).encode()).hexdigest()[:16]


def files_fingerprint(files: list[str]) -> str:
    """sha256 over (name, size, mtime) of ``files``: changes when the data are rewritten."""
    digest = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        digest.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def cached(
    cache_dir: str | Path,
    name: str,
    identity: dict[str, Any],
    compute: Callable[[], tuple[np.ndarray, list[str]]],
) -> FeatureSet:
    """The features stored for ``identity``, or ``compute()`` -> (features [N, D], ids) saved first."""
    identity = {"format": CACHE_FORMAT, **identity}
    stem = Path(cache_dir) / f"{name}-{identity_key(identity)}"
    meta_path, npy_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if meta_path.is_file() and npy_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            feats = np.load(npy_path, allow_pickle=False)
            if meta.get("identity") == identity and list(feats.shape) == meta.get("shape"):
                return FeatureSet(feats, list(meta["ids"]), identity)
            log.warning("%s: stale or mismatched cache entry; recomputing", meta_path)
        except (ValueError, OSError, KeyError) as err:
            log.warning("%s: unreadable cache entry (%s); recomputing", meta_path, err)
    feats, ids = compute()
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if len(ids) != len(feats):
        raise ValueError(f"{name}: {len(feats)} feature rows for {len(ids)} ids")

    def write_npy(fh: Any) -> None:
        buf = io.BytesIO()
        np.save(buf, feats, allow_pickle=False)
        fh.write(buf.getvalue())

    atomic_save(npy_path, write_npy)
    atomic_write_json(
        meta_path, {"ids": list(ids), "identity": identity, "shape": list(feats.shape)}
    )
    return FeatureSet(feats, list(ids), identity)


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


def dataset_identity(images: Any, data: str | Path, split: str) -> dict[str, Any]:
    return {
        "root": str(Path(data).resolve()),
        "split": split,
        "image_size": images.image_size,
        "n": len(images.ids),
        "files": files_fingerprint(images.files),
    }


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
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {LAYERS}")
    model, meta = load_model(checkpoint)
    images = split_images(voc_root, split, model.input_size, rule)
    identity = {
        "checkpoint_sha256": meta["sha256"],
        "data": dataset_identity(images, voc_root, split),
        "layer": layer,
        "hole": hole_digest(hole),
    }

    def compute() -> tuple[np.ndarray, list[str]]:
        if layer == "bottleneck":  # a function of pool5: reuse its cache instead of the images
            pool5 = extract_features(
                checkpoint, voc_root, split, "pool5", hole, cache_dir, batch_size, device, rule
            )
            return bottleneck_from_pool5(model, pool5.features, batch_size), pool5.ids
        log.info("encoding %d images of %s/%s with %s", len(images), voc_root, split, checkpoint)
        feats = encode_images(
            model, images, meta["data_mean"], layer, hole, batch_size, pick_device(str(device))
        )
        return feats, list(images.ids)

    return cached(cache_dir, f"{layer}-{split}", identity, compute)


@torch.no_grad()
def bottleneck_from_pool5(
    model: ContextEncoder, pool5: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Flattened pool5 [N, C*n*n] -> flattened bottleneck output [N, D] (on the CPU)."""
    model.eval().cpu()
    size = model.input_size
    shape = model.forward_encoder(torch.zeros(1, 3, size, size)).shape[1:]  # (C, n, n)
    out = [
        model.forward_bottleneck(torch.from_numpy(pool5[i : i + batch_size]).view(-1, *shape))
        .flatten(1)
        .numpy()
        for i in range(0, len(pool5), batch_size)
    ]
    return np.concatenate(out, axis=0)
