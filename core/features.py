"""Layer features of a pretext network, one extractor for every stage, and their on-disk cache.

:func:`layer_features` runs the frozen network once over a set of images and returns, per layer,
the flattened (optionally average-pooled) map as float32 [N, D] (dinov2 ``eval/utils.py``'s single
``extract_features``). Layers (:data:`FEATURE_LAYERS`):

- ``conv1`` ... ``conv5``: AlexNet-style encoders after each ReLU (VISSL's AlexNet eval features);
  the 128-px DCGAN encoder after each of its five k4 s2 blocks (after LeakyReLU);
- ``pool5``: the encoder output [N, C, n, n];
- ``bottleneck``: the channel-wise FC (or the 4000-d FC of inpaint128) on top of it.

The frozen protocols report :data:`LAYERS` (conv1 ... conv5, bottleneck; ``svm_best_layer`` is a
1-based index into it), pooled to about 9k dimensions by :func:`pooling_for` (VISSL's AlexNet
pooling); retrieval and nearest-neighbour inpainting use :data:`FLAT_LAYERS` unpooled.

Cache (``cached``, dino's ``--dump_features``): ``<cache_dir>/<layer>-<key>.npy`` (float32 [N, D],
raw) and ``.json`` ({"ids", "identity", "shape"}), written atomically, the JSON last (it marks the
pair complete). ``key`` hashes the whole identity (:func:`feature_identity`: checkpoint sha256, the
dataset's resolved root, split, image size and file fingerprint, layer, pooling, hole), so the file
name is flat whatever the split is (``.``, a dotted file name, an absolute path).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.atomic_io import atomic_save, atomic_write_json
from core.checkpoint import CheckpointError
from core.data import fill_holes, to_unit_range
from core.models import AlexNetEncoder, ContextEncoder, DCGANEncoder

log = logging.getLogger(__name__)

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck")  # the frozen protocols' layers
FLAT_LAYERS = ("pool5", "bottleneck")  # taken whole (retrieval, nearest-neighbour inpainting)
FEATURE_LAYERS = (*LAYERS[:5], "pool5", "bottleneck")
CONV_LAYERS = LAYERS[:5]
TARGET_DIM = 9216  # VISSL's AlexNet pooling gives 9600 / 9216 / 9600 / 9600 / 9216 at 227 px
CACHE_FORMAT = 2  # bump when the way features are computed or cached changes
DEFAULT_CACHE_DIR = "runs/cache/features"

Pooling = tuple[int, int] | None  # (kernel, stride) of an average pooling, or None (flattened)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero). x: [N, D] -> float32 [N, D]."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# ---- layers and their pooling -------------------------------------------------------------------


def conv_maps(model: ContextEncoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x: [N, 3, S, S] in [-1, 1] -> {'conv1'..'conv5', 'pool5', 'bottleneck': [N, ...]}."""
    encoder = model.encoder
    if isinstance(encoder, AlexNetEncoder):
        maps = encoder.forward_features(x)
    elif isinstance(encoder, DCGANEncoder):
        maps, out, i = {}, x, 0
        for layer in encoder.layers:
            out = layer(out)
            if isinstance(layer, nn.LeakyReLU):
                i += 1
                maps[f"conv{i}"] = out.clone()  # the next block's LeakyReLU is in place
        maps["pool5"] = out
    else:
        raise CheckpointError(f"no conv1..conv5 features for encoder {type(encoder).__name__}")
    maps["bottleneck"] = model.forward_bottleneck(maps["pool5"])
    return maps


@torch.no_grad()
def layer_shapes(model: ContextEncoder) -> dict[str, tuple[int, ...]]:
    """Shape of each layer's map for one image of the model's input size."""
    model.eval()
    size = model.input_size
    return {
        k: tuple(v.shape[1:]) for k, v in conv_maps(model, torch.zeros(1, 3, size, size)).items()
    }


def pool_spec(size: int, channels: int, target_dim: int = TARGET_DIM) -> tuple[int, int]:
    """(kernel, stride) of the average pooling that brings a [channels, size, size] map to about
    ``target_dim`` values.

    Output side g = round(sqrt(target_dim / channels)), at most ``size``; stride s =
    round(size / (g + 4)) (at least 1), kernel = size - s (g - 1), so each window is about five
    strides wide. This reproduces VISSL's AlexNet pooling at 227 px exactly: conv1 55x55x96 -> k19 s4
    (10x10, 9600 d), conv2 27x27x256 -> k12 s3 (6x6, 9216), conv3/conv4 13x13x384 -> k9 s1 (5x5,
    9600), conv5 13x13x256 -> k8 s1 (6x6, 9216).
    """
    side = min(size, max(1, round(math.sqrt(target_dim / channels))))
    stride = max(1, round(size / (side + 4)))
    kernel = size - stride * (side - 1)
    assert kernel >= 1 and (size - kernel) // stride + 1 == side, (size, channels, side, stride)
    return kernel, stride


def pooling_for(model: ContextEncoder, target_dim: int = TARGET_DIM) -> dict[str, Pooling]:
    """:data:`LAYERS` -> (kernel, stride) of its average pooling, None for the bottleneck."""
    shapes = layer_shapes(model)
    return {
        name: None
        if name == "bottleneck"
        else pool_spec(shapes[name][-1], shapes[name][0], target_dim)
        for name in LAYERS
    }


def pool_and_flatten(fmap: torch.Tensor, spec: Pooling) -> torch.Tensor:
    """[N, C, h, h] -> [N, D]: average-pooled with (kernel, stride) = ``spec``, flattened."""
    if spec is not None:
        fmap = F.avg_pool2d(fmap, spec[0], spec[1])
    return fmap.flatten(1)


# ---- the extractor ------------------------------------------------------------------------------


def batch_features(
    model: ContextEncoder, x: torch.Tensor, layers: tuple[str, ...], pooling: dict[str, Pooling]
) -> dict[str, torch.Tensor]:
    """x: [N, 3, S, S] in [-1, 1] -> {layer: [N, D]}, pooled (``pooling``, missing: none), flat."""
    if any(layer in CONV_LAYERS for layer in layers):
        maps = conv_maps(model, x)
    else:  # pool5 / bottleneck of any encoder
        maps = {"pool5": model.forward_encoder(x)}
        if "bottleneck" in layers:
            maps["bottleneck"] = model.forward_bottleneck(maps["pool5"])
    return {layer: pool_and_flatten(maps[layer], pooling.get(layer)) for layer in layers}


@torch.no_grad()
def layer_features(
    model: ContextEncoder,
    images: Dataset | torch.Tensor,
    layers: tuple[str, ...],
    pooling: dict[str, Pooling] | None = None,
    hole: np.ndarray | None = None,
    data_mean: list[float] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """One pass over uint8 images [N, 3, S, S] (a tensor, or a dataset whose items are images or
    (image, ...) tuples): {layer: float32 [N, D]}, raw (not normalised).

    ``pooling``: layer -> (kernel, stride) of an average pooling before flattening (missing: none).
    ``hole`` ([S, S] bool): those pixels are replaced by ``data_mean`` before encoding (§3.3).
    """
    bad = [layer for layer in layers if layer not in FEATURE_LAYERS]
    if bad or not layers:
        raise ValueError(f"unknown layer(s) {bad or list(layers)}; choose from {FEATURE_LAYERS}")
    pooling = pooling or {}
    model.eval().to(device)
    size = model.input_size
    hole_t = None if hole is None else torch.as_tensor(np.asarray(hole, dtype=bool))
    if hole_t is not None and hole_t.shape != (size, size):
        raise ValueError(f"hole has shape {tuple(hole_t.shape)}, expected ({size}, {size})")
    mean = None if hole_t is None else torch.tensor(data_mean, dtype=torch.float32)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for batch in DataLoader(images, batch_size=batch_size):  # type: ignore[arg-type]
        if isinstance(batch, (list, tuple)):  # datasets that also return labels
            batch = batch[0]
        if batch.shape[-1] != size:
            raise ValueError(f"images are {batch.shape[-1]} px, the model takes {size} px")
        x = to_unit_range(batch)
        if hole_t is not None:
            x = fill_holes(x, hole_t.expand(len(x), 1, size, size), mean)
        for layer, feats in batch_features(model, x.to(device), layers, pooling).items():
            out[layer].append(feats.float().cpu().numpy())
    return {
        layer: np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)
        for layer, parts in out.items()
    }


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


# ---- cache --------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """``features``: float32 [N, D]; ``ids``: the N image ids; ``identity``: what they depend on."""

    features: np.ndarray
    ids: list[str]
    identity: dict[str, Any]

    def normalized(self) -> np.ndarray:
        return l2_normalize(self.features)


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


def dataset_identity(images: Any, data: str | Path, split: str) -> dict[str, Any]:
    """What a split's images depend on: resolved root, split, image size, count, file fingerprint."""
    return {
        "root": str(Path(data).resolve()),
        "split": split,
        "image_size": images.image_size,
        "n": len(images.ids),
        "files": files_fingerprint(images.files),
    }


def as_list(spec: Pooling) -> list[int] | None:
    """JSON form of a pooling spec (cache identities are compared after a JSON round trip)."""
    return None if spec is None else [int(v) for v in spec]


def feature_identity(
    sha256: str,
    data: dict[str, Any],
    layer: str,
    pooling: Pooling = None,
    hole: np.ndarray | None = None,
) -> dict[str, Any]:
    """The one cache identity of a feature set: checkpoint sha256, :func:`dataset_identity`,
    layer, pooling and hole."""
    return {"format": CACHE_FORMAT, "checkpoint_sha256": sha256, "data": data, "layer": layer,
            "pooling": as_list(pooling), "hole": hole_digest(hole)}  # fmt: skip


def cache_stem(cache_dir: str | Path, identity: dict[str, Any]) -> Path:
    """``<cache_dir>/<layer>-<key>``: flat, whatever the split's name."""
    layer = re.sub(r"[^A-Za-z0-9_]", "_", str(identity.get("layer", "features")))
    return Path(cache_dir) / f"{layer}-{identity_key(identity)}"


def cached(
    cache_dir: str | Path,
    identity: dict[str, Any],
    compute: Callable[[], tuple[np.ndarray, list[str]]],
) -> FeatureSet:
    """The features stored for ``identity``, or ``compute()`` -> (features [N, D], ids) saved first."""
    stem = str(cache_stem(cache_dir, identity))
    meta_path, npy_path = Path(stem + ".json"), Path(stem + ".npy")
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
        raise ValueError(f"{meta_path.name}: {len(feats)} feature rows for {len(ids)} ids")

    def write_npy(fh: Any) -> None:
        buf = io.BytesIO()
        np.save(buf, feats, allow_pickle=False)
        fh.write(buf.getvalue())

    atomic_save(npy_path, write_npy)
    atomic_write_json(
        meta_path, {"ids": list(ids), "identity": identity, "shape": list(feats.shape)}
    )
    return FeatureSet(feats, list(ids), identity)


def split_features(
    model: ContextEncoder,
    images: Any,
    data: str | Path,
    split: str,
    sha256: str,
    pooling: dict[str, Pooling],
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """{layer: float32 [N, D]} of the layers of ``pooling`` for the ``split`` images of ``data``
    (``images``: a dataset with ``.ids``, ``.files``, ``.image_size``), each layer cached on its
    own; on the first miss one :func:`layer_features` pass encodes every layer."""
    identity = dataset_identity(images, data, split)
    computed: dict[str, np.ndarray] = {}

    def one(layer: str) -> tuple[np.ndarray, list[str]]:
        if not computed:
            log.info("encoding %d images of %s/%s", len(images), data, split)
            computed.update(
                layer_features(
                    model, images, tuple(pooling), pooling, None, None, batch_size, device
                )
            )
        return computed[layer], list(images.ids)

    feats = {}
    for layer, spec in pooling.items():
        fs = cached(
            cache_dir, feature_identity(sha256, identity, layer, spec), lambda k=layer: one(k)
        )
        if fs.ids != list(images.ids):
            raise ValueError(f"{cache_dir}: cached ids of {layer}/{split} do not match the split")
        feats[layer] = fs.features
    return feats
