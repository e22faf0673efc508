"""``method=kmeans_init``: Krähenbühl, Doersch, Donahue & Darrell, "Data-dependent Initializations
of Convolutional Neural Networks" (ICLR 2016; reference code philkr/magic_init), the k-means variant:
a training-free row beside random init, the field's strong random baseline (Zhang et al. 2017,
Table 2). Every convolution of the encoder, in network order, gets k-means centres of whitened
patches of its input as filters, then the within-layer (mean / std per unit) and between-layer
scaling (:mod:`core.kmeans_init`). No step is trained; the checkpoint is the step-0 one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from core import run_folder
from core.atomic_io import atomic_write_json
from core.config import ConfigError
from core.data import to_unit_range
from core.kmeans_init import KMeansInitConfig, kmeans_init_, summary_metrics
from pretext.methods.base import build_images
from pretext.methods.random_init import RandomInit


@dataclass
class KMeansConfig:
    """method=kmeans_init: how many training images the init sees, and the init's own options."""

    images: int = 160  # magic_init.py's default: 10 batches of 16
    init: KMeansInitConfig = field(default_factory=KMeansInitConfig)


class KMeansInit(RandomInit):
    """The network after the k-means data-dependent init of its encoder (``kmeans:`` settings)."""

    trained_parts = ("encoder",)  # set from data (k-means), not by gradient steps

    def __init__(self, cfg: Any, model: Any):
        super().__init__(cfg, model)
        self.report: dict[str, Any] | None = None  # the full report, where the init ran
        self.summary: dict[str, float] = {}  # its numbers, also kept in the checkpoint

    @classmethod
    def resolve_config(cls, cfg: Any) -> Any:
        if cfg.kmeans.images < 1 or cfg.kmeans.init.max_patches < 1:
            raise ConfigError(
                f"kmeans: images={cfg.kmeans.images}, init.max_patches="
                f"{cfg.kmeans.init.max_patches}: both must be at least 1"
            )
        return super().resolve_config(cfg)

    def init_encoder(self, encoder: nn.Module, images: Dataset) -> None:
        """k-means init from ``kmeans.images`` eval views of the training split, a seeded draw
        (the reference uses 10 batches of 16 training images)."""
        cfg = self.cfg
        views = build_images(cfg, cfg.data.split, False, self.input_size)
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.kmeans.images, len(views))
        picks = np.sort(rng.choice(len(views), size=n, replace=False))
        device = next(encoder.parameters()).device
        x = to_unit_range(torch.stack([views[int(i)] for i in picks]).to(device))
        self.report = kmeans_init_(encoder, x, seed=cfg.seed, cfg=cfg.kmeans.init)
        self.summary = summary_metrics(self.report)

    def extra_state(self) -> dict[str, Any]:
        # the init's summary, so a run resumed after its step-0 checkpoint still records it
        return {"init": self.summary} if self.summary else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.summary = state.get("init", {})

    def evaluate(
        self, run_dir: Path, device: torch.device, mean: list[float], progress: dict[str, float]
    ) -> dict[str, Any]:
        result = super().evaluate(run_dir, device, mean, progress)
        if self.report is not None:
            atomic_write_json(run_folder.output_path(run_dir, "init.json"), self.report)
        return {**result, **self.summary}
