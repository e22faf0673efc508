"""The online kNN probe of a pretext run (solo-learn's online kNN, ``solo/utils/knn.py``): every
``probe.every`` steps, and at step 0 and the last step, rank 0 encodes a small labelled held-out
set with the frozen encoder (:func:`core.features.layer_features`, eval mode, no grad), scores
multi-label kNN on it (:func:`core.knn.knn_scores`: the bank split votes for the query split) and
appends one ``metrics.jsonl`` line ``{"step", "images_seen", "probe/knn_<layer>_mAP", ...}``.

The probe changes nothing the training reads: the global torch / CUDA, numpy and Python RNG
states and every module's train / eval mode are restored afterwards, and in eval mode BatchNorm
keeps its statistics, so the weights after N steps are the same with the probe on or off
(tests/test_probe.py). Its sets are never the test split: the budget curves choose nothing, but a
number computed on test during training would invite choosing by it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.config import ConfigError
from core.features import CONV_LAYERS, FEATURE_LAYERS, layer_features, pooling_for
from core.knn import knn_scores
from core.models import ContextEncoder
from core.splits import open_split
from core.stage_inputs import Input
from core.voc_ap import mean_ap, voc07_classification_ap
from core.voc_splits import dataset_classes, require_split, voc_root
from pretext.methods.base import eval_picks


@dataclass
class ProbeConfig:
    every: int = 0  # steps between probes (also at step 0 and the last step); 0: no probe
    data: str = "data/minivoc/VOC2007"  # a labelled VOC root (default: the built-in transfer set)
    bank_split: str = "train"  # the kNN database
    query_split: str = "val"  # scored by VOC07 AP; never test
    layers: tuple[str, ...] = CONV_LAYERS  # one encoder pass gives all; pooled as eval.frozen
    k: int = 20
    temperature: float = 0.07
    max_images: int = 256  # per split, spread evenly over it (0: all)
    batch_size: int = 64


def check_config(p: ProbeConfig) -> None:
    if p.every < 0:
        raise ConfigError(f"probe.every: {p.every} < 0 (0: no probe)")
    if p.every == 0:
        return
    bad = [layer for layer in p.layers if layer not in FEATURE_LAYERS]
    if bad or not p.layers:
        raise ConfigError(
            f"probe.layers: unknown or empty {bad or list(p.layers)}; choose from {FEATURE_LAYERS}"
        )
    for key in ("bank_split", "query_split"):
        if getattr(p, key) == "test":
            raise ConfigError(f"probe.{key}: the probe never reads the test split")
    if p.k < 1 or p.temperature <= 0 or p.max_images < 0 or p.batch_size < 1:
        raise ConfigError(
            "probe: k and batch_size must be >= 1, temperature > 0, max_images >= 0; got "
            f"k={p.k}, temperature={p.temperature}, max_images={p.max_images}, "
            f"batch_size={p.batch_size}"
        )


def check_data(p: ProbeConfig) -> None:
    """What :class:`Probe` opens, without reading an image: the VOC root, its classes and both
    split files (a UserError naming the file)."""
    root = voc_root(p.data, "probe.data=")
    dataset_classes(root)
    for split in (p.bank_split, p.query_split):
        require_split(root, split)


def input_checks(p: ProbeConfig) -> list[Input]:
    return [Input("probe.data", p.data, lambda: check_data(p))] if p.every > 0 else []


def due(p: ProbeConfig, step: int, total: int) -> bool:
    """A probe at ``step``: every ``every`` steps, at step 0 and at the last step."""
    return p.every > 0 and (step % p.every == 0 or step == total)


@contextlib.contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Restore, on exit, the RNG states (torch CPU + CUDA, numpy, Python) and every module's
    train / eval mode: a DataLoader draws its base seed from the torch RNG even unshuffled."""
    modes = [(m, m.training) for m in model.modules()]
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        for m, training in modes:
            m.train(training)


class Probe:
    """The probe's two sets (opened on first use) and the pooling of each layer, fixed from the
    network's shapes when built (on the CPU, before the network is moved)."""

    def __init__(self, cfg: ProbeConfig, model: ContextEncoder, images: Any):
        self.cfg, self.images = cfg, images  # images: the intake rule (core.images.ImagesConfig)
        with untouched(model):
            pooling = pooling_for(model)
        self.pooling = {layer: pooling.get(layer) for layer in cfg.layers}
        self.sets: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
        self.size = model.input_size

    def labelled(self, split: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(uint8 images [N, 3, S, S], labels [N, C], difficult_only [N, C]) of up to
        ``max_images`` of ``split``, decoded once and kept (a few MB): later probes only encode."""
        if split not in self.sets:
            root = voc_root(self.cfg.data)
            ds = open_split(root, split, self.size, False, labels=True, fmt="voc", rule=self.images)
            items = [ds[int(i)] for i in eval_picks(len(ds), self.cfg.max_images)]
            images, labels, difficult = (torch.stack(parts) for parts in zip(*items))
            self.sets[split] = (images, labels.numpy(), difficult.numpy())
        return self.sets[split]

    def __call__(self, model: ContextEncoder, device: torch.device) -> dict[str, float]:
        """{``probe/knn_<layer>_mAP``: VOC07 mAP of the query split}."""
        p = self.cfg
        feats = {}
        with untouched(model):
            for split in (p.bank_split, p.query_split):
                feats[split] = layer_features(
                    model, self.labelled(split)[0], p.layers, self.pooling,
                    batch_size=p.batch_size, device=device,
                )  # fmt: skip
        _, ybank, dbank = self.labelled(p.bank_split)
        _, yq, dq = self.labelled(p.query_split)
        out = {}
        for layer in p.layers:
            votes = knn_scores(
                feats[p.bank_split][layer], ybank * (1 - dbank), feats[p.query_split][layer],
                p.k, p.temperature,
            )  # fmt: skip
            out[f"probe/knn_{layer}_mAP"] = mean_ap(voc07_classification_ap(votes, yq, dq))
        return out
