"""VOC07 detection with Faster R-CNN (mmdet 3.3) on a pretext encoder: ``python -m transfer.detect``.

    python -m transfer.detect --checkpoint runs/dev/ce --data data/minivoc/VOC2007 run_dir=runs/det

Trains on ``train_split`` (trainval) and reports mmdet's VOCMetric on ``test_split`` (test): VOC07
11-point mAP at IoU 0.5, difficult objects ignored. The network is the mmdet config
``transfer/configs/faster_rcnn_ce_voc.py`` (RPN + RoI head on conv5, no FPN); its backbone, classes,
data root and schedule are filled in from this config. Real VOC: ``--data VOCdevkit/VOC2007``.
Result keys: ``mAP`` (fraction), ``AP50``, ``AP_<class>`` (the dataset's class names), ``time_s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.cli import run_cli
from core.config import parse_cli
from core.models import Geometry
from core.stage_inputs import Input
from transfer import mm_run

log = logging.getLogger("transfer.detect")
CONFIG = str(Path(__file__).parent / "configs" / "faster_rcnn_ce_voc.py")


@dataclass
class Config(mm_run.MMConfig):
    run_dir: str = "runs/transfer/detect/default"
    mm_config: str = CONFIG
    max_iters: int = 300
    batch_size: int = 8
    # AdamW: on the mini-VOC budget (300 iterations), SGD at mmdet's lr leaves every init near 0 mAP
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 5e-4
    image_scale: tuple[int, int] = (160, 128)  # (long, short) side bounds; real VOC: (1000, 600)


def parse_config(argv: list[str] | None = None) -> Config:
    flags = {"checkpoint": "pretext checkpoint (.pt or run folder)",
             "data": "VOC year folder, e.g. VOCdevkit/VOC2007"}  # fmt: skip
    return mm_run.check_schedule(parse_cli(Config, argv, __doc__, "max_iters=100", flags))


def configure(
    mm: Any, cfg: Config, root: Path, classes: tuple[str, ...], channels: int, geo: Geometry
) -> None:
    """Fill the Faster R-CNN config in place for this encoder and dataset."""
    model = mm.model
    model.data_preprocessor.pad_size_divisor = geo.stride
    model.rpn_head.in_channels = channels
    model.rpn_head.anchor_generator.strides = [geo.stride]
    # Anchor of cell i centred where that cell looks: first_center + stride * i (a pixel index;
    # + 0.5 in mmdet's continuous coordinates). mmdet's default puts it at stride * i.
    center = geo.first_center + 0.5
    model.rpn_head.anchor_generator.centers = [(center, center)]
    model.roi_head.bbox_roi_extractor.out_channels = channels
    model.roi_head.bbox_roi_extractor.featmap_strides = [geo.stride]
    model.roi_head.bbox_head.in_channels = channels
    model.roi_head.bbox_head.num_classes = len(classes)
    # mmdet's VOCDataset: data_root = the VOCdevkit-like parent, sub_data_root = the year folder.
    for loader, split in (
        ("train_dataloader", cfg.train_split),
        ("test_dataloader", cfg.test_split),
    ):
        ds = mm[loader].dataset
        ds.data_root = str(root.parent)
        ds.ann_file = f"{root.name}/ImageSets/Main/{split}.txt"
        ds.data_prefix = dict(sub_data_root=f"{root.name}/")
        ds.metainfo = dict(classes=tuple(classes))
        for step in ds.pipeline:
            if step["type"] == "Resize":
                step["scale"] = tuple(cfg.image_scale)
    mm.metainfo = dict(classes=tuple(classes))  # the config file's MiniVOC default, for the log
    mm.test_dataloader.batch_size = cfg.batch_size


def to_result(metrics: dict[str, float]) -> dict[str, float]:
    """mAP, AP50 and AP_<class> (the dataset's class names, DatasetClassVOCMetric)."""
    out = {"mAP": metrics["pascal_voc/mAP"], "AP50": metrics["pascal_voc/AP50"]}
    prefix = "pascal_voc/AP_"
    out.update(
        {k.removeprefix("pascal_voc/"): v for k, v in metrics.items() if k.startswith(prefix)}
    )
    return out


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight)."""
    return mm_run.input_checks(cfg, "Main")


def main(cfg: Config) -> dict[str, float]:
    """Train + test Faster R-CNN in ``cfg.run_dir`` (or return its recorded result)."""
    return mm_run.run("detect", cfg, configure, "Main", to_result)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return main(parse_config(argv))


if __name__ == "__main__":
    run_cli(cli)
