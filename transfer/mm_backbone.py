"""The pretext encoder as an mmdet backbone and an mmseg backbone (the one mm adapter module).

Importing this module registers :class:`PretextAlexNet` in ``mmdet.registry.MODELS`` and in
``mmseg.registry.MODELS``, and the metrics that name classes by the dataset's own names
(:class:`DatasetClassVOCMetric`, :class:`PerClassIoUMetric`) in their METRICS (two separate registries; a stage picks one through its config's
``default_scope``). The configs in transfer/configs/ import it with ``custom_imports``.

Images reach the backbone normalised to [-1, 1] like in pretext training: the data preprocessors
use mean = std = 127.5 with ``bgr_to_rgb=True`` (core.data.to_unit_range).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from mmdet.evaluation.functional import eval_map
from mmdet.evaluation.metrics import VOCMetric
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmseg.evaluation.metrics import IoUMetric

from core.checkpoint import CheckpointError
from core.features import CONV_LAYERS
from core.models import ARCHS, AlexNetEncoder
from core.pretrained import Pretrained

FEATURES = (*CONV_LAYERS, "pool5")


class PretextAlexNet(BaseModule):
    """AlexNet-style pretext encoder returning a tuple of feature maps.

    Args:
        checkpoint: a pretext checkpoint (``.pt`` or a pretext run folder); None = random init
            (Kaiming, as at pretext step 0) of ``arch``.
        arch: the expected architecture; with a checkpoint of another arch a CheckpointError is
            raised. With ``checkpoint=None`` it picks the network to build.
        out_features: names among conv1..conv5, pool5, in the order they are returned.
        frozen_stages: conv1..conv{frozen_stages} get no gradient (0 = train everything).

    forward(x: [N, 3, H, W] in [-1, 1]) -> tuple of [N, C_f, H / s_f, W / s_f] (conv5 of small64:
    C=96, s=8; of alexnet227: C=256, s=16; core.models.detection_geometry).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        arch: str | None = "small64",
        out_features: tuple[str, ...] | list[str] = ("conv5",),
        frozen_stages: int = 0,
        init_cfg: Any = None,
    ):
        super().__init__(init_cfg=init_cfg)
        unknown = [f for f in out_features if f not in FEATURES]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)}: choose among {list(FEATURES)}")
        if checkpoint:
            pre = Pretrained.load(checkpoint, arch)
            encoder, self.source = pre.encoder(), pre.source
        else:
            if arch not in ARCHS:
                raise ValueError(f"arch {arch!r}: choose one of {sorted(ARCHS)}")
            encoder = ARCHS[arch]().encoder
            self.source = {"method": "random_init", "arch": arch, "path": None}
        if not isinstance(encoder, AlexNetEncoder):
            raise CheckpointError(
                f"{checkpoint or arch}: arch {self.source['arch']!r} has no AlexNet encoder "
                "(conv1..conv5); transfer supports small64*, alexnet227*"
            )
        self.encoder = encoder
        self.out_features = tuple(out_features)
        self.frozen_stages = frozen_stages
        self._freeze()

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map (for the neck / head ``in_channels``)."""
        return [self.encoder.spec.channels[min(CONV_LAYERS.index(f), 4)] if f != "pool5"
                else self.encoder.out_channels for f in self.out_features]  # fmt: skip

    def _freeze(self) -> None:
        for name in CONV_LAYERS[: self.frozen_stages]:
            for p in getattr(self.encoder, name).parameters():
                p.requires_grad_(False)

    def init_weights(self) -> None:
        # The weights come from the checkpoint (or the encoder's own init) in __init__; the
        # runner's init_weights must not overwrite them, unless an init_cfg asks to (mmengine's
        # Pretrained with prefix="backbone.": a `python -m core.export --format mm` file).
        if self.init_cfg is not None:
            super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.encoder.forward_features(x)
        return tuple(feats[f] for f in self.out_features)


def _class_key(name: str) -> str:
    return "_".join(str(name).split())


class DatasetClassVOCMetric(VOCMetric):
    """mmdet's VOCMetric (mAP at each IoU threshold, legacy coordinates) that names classes by the
    dataset's ``classes``, never VOC's 20 (VOCMetric prints VOC's names for any dataset under a
    ``VOC2007`` folder), and adds ``AP_<class>`` (AP at the first IoU threshold) to its result."""

    def compute_metrics(self, results: list) -> dict:
        if self.metric != "mAP":
            return super().compute_metrics(results)
        classes = self.dataset_meta["classes"]
        gts, preds = zip(*results)
        out: dict[str, float] = {}
        mean_aps = []
        for k, iou_thr in enumerate(self.iou_thrs):
            mean_ap, per_class = eval_map(
                preds, gts, scale_ranges=self.scale_ranges, iou_thr=iou_thr, dataset=list(classes),
                logger=MMLogger.get_current_instance(), eval_mode=self.eval_mode,
                use_legacy_coordinate=True,
            )  # fmt: skip
            mean_aps.append(mean_ap)
            out[f"AP{int(iou_thr * 100):02d}"] = round(mean_ap, 3)
            if k == 0:
                for name, r in zip(classes, per_class):
                    out[f"AP_{_class_key(name)}"] = float(r["ap"]) if r["num_gts"] else math.nan
        return {"mAP": sum(mean_aps) / len(mean_aps), **out}


class PerClassIoUMetric(IoUMetric):
    """mmseg's IoUMetric + ``IoU_<class>`` (percent, like mIoU; NaN for a class absent from both
    the labels and the predictions), named by the dataset's classes."""

    def compute_metrics(self, results: list) -> dict:
        out = super().compute_metrics(results)
        intersect = sum(r[0] for r in results).double()
        union = sum(r[1] for r in results).double()
        for name, i, u in zip(self.dataset_meta["classes"], intersect, union):
            out[f"IoU_{_class_key(name)}"] = float(100 * i / u) if u > 0 else math.nan
        return out


def _register() -> None:
    from mmdet.registry import METRICS as MMDET_METRICS
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import METRICS as MMSEG_METRICS
    from mmseg.registry import MODELS as MMSEG_MODELS

    for registry in (MMDET_MODELS, MMSEG_MODELS):
        registry.register_module("PretextAlexNet", module=PretextAlexNet, force=True)
    MMDET_METRICS.register_module("DatasetClassVOCMetric", module=DatasetClassVOCMetric, force=True)
    MMSEG_METRICS.register_module("PerClassIoUMetric", module=PerClassIoUMetric, force=True)


_register()
