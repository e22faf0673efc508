"""Encoder features of a dataset split, computed once and cached on disk (dino's ``--dump_features``).

A feature set is one layer (:data:`core.features.FLAT_LAYERS`: ``pool5``, ``bottleneck``) of a
pretext checkpoint's network, flattened, for every image of a dataset split (a VOC split, a folder
of images or a split file; :func:`core.splits.open_split`) in the eval view (short side resized to S, centre
crop), computed by :func:`core.features.layer_features` and cached by :func:`core.features.cached`.

With a ``hole`` ([S, S] bool) only the context around it is encoded (hole pixels filled with the
checkpoint's ``data_mean`` as in training, §3.3): the paper's Fig. 8 ("context nearest neighbours").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from core.features import (
    DEFAULT_CACHE_DIR,
    FLAT_LAYERS,
    FeatureSet,
    bottleneck_from_pool5,
    cached,
    dataset_identity,
    feature_identity,
    layer_features,
)
from core.images import ImagesConfig
from core.machine import pick_device
from core.pretrained import Pretrained
from core.splits import open_split

log = logging.getLogger(__name__)


def extract_features(
    checkpoint: str | Path | Pretrained,
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

    ``checkpoint``: a pretext checkpoint, or one already read (:class:`Pretrained`: a stage reads
    each file once); ``voc_root``: a VOC root or a folder of images; ``split`` as in
    :func:`core.splits.open_split`; ``rule``: the intake rule (a skipped file is absent from the ids
    and the files' fingerprint)."""
    if layer not in FLAT_LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {FLAT_LAYERS}")
    pre = checkpoint if isinstance(checkpoint, Pretrained) else Pretrained.load(checkpoint)
    model = pre.network().eval()
    images = open_split(voc_root, split, model.input_size, False, rule=rule)
    data = dataset_identity(images, voc_root, split)
    identity = feature_identity(pre.sha256, data, layer, None, hole)

    def compute() -> tuple[np.ndarray, list[str]]:
        if layer == "bottleneck":  # a function of pool5: reuse its cache instead of the images
            pool5 = extract_features(
                pre, voc_root, split, "pool5", hole, cache_dir, batch_size, device, rule
            )
            return bottleneck_from_pool5(model, pool5.features, batch_size), pool5.ids
        log.info("encoding %d images of %s/%s with %s", len(images), voc_root, split, pre.given)
        feats = layer_features(
            model, images, (layer,), None, hole, pre.data_mean, batch_size,
            pick_device(str(device)),
        )[layer]  # fmt: skip
        return feats, list(images.ids)

    return cached(cache_dir, identity, compute)
