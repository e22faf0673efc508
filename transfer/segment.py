"""VOC semantic segmentation with an FCN head (mmseg 1.2) on a pretext encoder:
``python -m transfer.segment``.

    python -m transfer.segment --checkpoint runs/dev/ce --data data/minivoc/VOC2007 run_dir=runs/seg

Trains on ``ImageSets/Segmentation/<train_split>.txt`` and reports mmseg's IoUMetric on
``<test_split>.txt`` (real VOC2012: train / val, ``--data VOCdevkit/VOC2012``). Classes are
background + the dataset's classes (label value = VOC index for VOC class names, else 1 + the
class's position in the dataset's list; 255 = void, ignored). The network is
``transfer/configs/fcn_ce_voc.py``. Result keys: ``mIoU``, ``mAcc``, ``aAcc``, ``IoU_<class>``
(fractions), ``time_s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.cli import run_cli
from core.config import parse_cli
from core.minivoc import voc_palette
from core.models import Geometry
from core.run_folder import TransferError
from core.stage_inputs import Input
from core.voc import VOC_CLASSES
from transfer import mm_run

log = logging.getLogger("transfer.segment")
CONFIG = str(Path(__file__).parent / "configs" / "fcn_ce_voc.py")


@dataclass
class Config(mm_run.MMConfig):
    run_dir: str = "runs/transfer/segment/default"
    mm_config: str = CONFIG
    train_split: str = "train"
    test_split: str = "val"
    max_iters: int = 1000  # ~100 s on one CPU thread for the mini-VOC's 252 training images
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 5e-4
    crop_size: int = 96
    image_scale: tuple[int, int] = (160, 128)  # (long, short) bounds; real VOC: (2048, 512)


def parse_config(argv: list[str] | None = None) -> Config:
    flags = {"checkpoint": "pretext checkpoint (.pt or run folder)",
             "data": "VOC year folder with SegmentationClass/, e.g. VOC2012"}  # fmt: skip
    return mm_run.check_schedule(parse_cli(Config, argv, __doc__, "max_iters=100", flags))


def seg_metainfo(classes: tuple[str, ...]) -> dict[str, Any]:
    """background + ``classes`` with their colours in the VOC palette.

    All VOC names (real VOC, MiniVOC): PNG value = VOC index; mmseg's PascalVOCDataset maps it to
    the position in this list (a subset gets a label map; values of other classes -> 255). Any other
    names: PNG value = 1 + position in ``classes`` (the dataset's order, voc.class_names)."""
    pal = voc_palette()
    vocab = all(c in VOC_CLASSES for c in classes)
    ids = [0] + [VOC_CLASSES.index(c) + 1 if vocab else i + 1 for i, c in enumerate(classes)]
    if max(ids) > 255:
        raise TransferError(f"{len(classes)} classes do not fit 8-bit SegmentationClass PNGs")
    return dict(classes=("background", *classes), palette=[pal[3 * i : 3 * i + 3] for i in ids])


def seg_dataset_type(classes: tuple[str, ...]) -> dict[str, Any]:
    """mmseg dataset fields: PascalVOCDataset for VOC names; for others BaseSegDataset (no class
    list of its own, so PNG values are used as they are: 0 background, i = classes[i - 1])."""
    if all(c in VOC_CLASSES for c in classes):
        return dict(type="PascalVOCDataset")
    return dict(type="BaseSegDataset", img_suffix=".jpg", seg_map_suffix=".png",
                reduce_zero_label=False)  # fmt: skip


def configure(
    mm: Any, cfg: Config, root: Path, classes: tuple[str, ...], channels: int, geo: Geometry
) -> None:
    """Fill the FCN config in place for this encoder and dataset."""
    del geo  # the decode head upsamples to the input size whatever the stride
    crop = (cfg.crop_size, cfg.crop_size)
    mm.model.data_preprocessor.size = crop
    mm.model.decode_head.in_channels = channels
    mm.model.decode_head.num_classes = len(classes) + 1
    meta = mm.metainfo = seg_metainfo(classes)  # also the config file's default, for the log
    for loader, split in (
        ("train_dataloader", cfg.train_split),
        ("test_dataloader", cfg.test_split),
    ):
        ds = mm[loader].dataset
        ds.data_root = str(root)
        ds.ann_file = f"ImageSets/Segmentation/{split}.txt"
        ds.metainfo = meta
        ds.update(seg_dataset_type(classes))
        for step in ds.pipeline:
            if step["type"] in ("Resize", "RandomResize"):
                step["scale"] = tuple(cfg.image_scale)
            if step["type"] == "RandomCrop":
                step["crop_size"] = crop


def to_result(metrics: dict[str, float]) -> dict[str, float]:
    """mIoU, mAcc, aAcc, IoU_<class> (background + the dataset's classes, PerClassIoUMetric).
    mmseg reports percentages; the suite records fractions."""
    keys = ("mIoU", "mAcc", "aAcc", *(k for k in metrics if k.startswith("IoU_")))
    return {k: metrics[k] / 100.0 for k in keys}


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight)."""
    return mm_run.input_checks(cfg, "Segmentation")


def main(cfg: Config) -> dict[str, float]:
    """Train + test the FCN in ``cfg.run_dir`` (or return its recorded result)."""
    return mm_run.run("segment", cfg, configure, "Segmentation", to_result)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return main(parse_config(argv))


if __name__ == "__main__":
    run_cli(cli)
