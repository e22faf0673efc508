"""VOC semantic segmentation with an FCN head (mmseg 1.2) on a pretext encoder:
``python -m transfer.segment``.

    python -m transfer.segment --checkpoint runs/dev/ce --data data/minivoc/VOC2007 run_dir=runs/seg

Trains on ``ImageSets/Segmentation/<train_split>.txt`` and reports mmseg's IoUMetric on
``<test_split>.txt`` (real VOC2012: train / val, ``--data VOCdevkit/VOC2012``). Classes are
background + the dataset's classes (label value = VOC index, 255 = void, ignored). The network is
``transfer/configs/fcn_ce_voc.py``. Result keys: ``mIoU``, ``mAcc``, ``aAcc`` (fractions), ``time_s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pretext.cli import run_cli
from pretext.config import parse_cli
from pretext.minivoc import voc_palette
from pretext.models import Geometry
from pretext.voc import VOC_CLASSES
from transfer import mm_run
from transfer.run_folder import TransferError

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
    return parse_cli(Config, argv, __doc__, "max_iters=100", flags)


def seg_metainfo(classes: tuple[str, ...]) -> dict[str, Any]:
    """background + ``classes`` with their VOC colours. mmseg maps PNG value = VOC index to the
    position in this list (a class subset gets a label map; values of other classes -> 255)."""
    unknown = [c for c in classes if c not in VOC_CLASSES]
    if unknown:
        raise TransferError(f"segmentation needs VOC class names; unknown: {unknown}")
    pal = voc_palette()
    ids = [0] + [VOC_CLASSES.index(c) + 1 for c in classes]
    return dict(classes=("background", *classes), palette=[pal[3 * i : 3 * i + 3] for i in ids])


def configure(
    mm: Any, cfg: Config, root: Path, classes: tuple[str, ...], channels: int, geo: Geometry
) -> None:
    """Fill the FCN config in place for this encoder and dataset."""
    del geo  # the decode head upsamples to the input size whatever the stride
    crop = (cfg.crop_size, cfg.crop_size)
    mm.model.data_preprocessor.size = crop
    mm.model.decode_head.in_channels = channels
    mm.model.decode_head.num_classes = len(classes) + 1
    meta = seg_metainfo(classes)
    for loader, split in (
        ("train_dataloader", cfg.train_split),
        ("test_dataloader", cfg.test_split),
    ):
        ds = mm[loader].dataset
        ds.data_root = str(root)
        ds.ann_file = f"ImageSets/Segmentation/{split}.txt"
        ds.metainfo = meta
        for step in ds.pipeline:
            if step["type"] in ("Resize", "RandomResize"):
                step["scale"] = tuple(cfg.image_scale)
            if step["type"] == "RandomCrop":
                step["crop_size"] = crop


def to_result(metrics: dict[str, float]) -> dict[str, float]:
    # mmseg reports percentages; the suite records fractions.
    return {k: metrics[k] / 100.0 for k in ("mIoU", "mAcc", "aAcc")}


def main(cfg: Config) -> dict[str, float]:
    """Train + test the FCN in ``cfg.run_dir`` (or return its recorded result)."""
    return mm_run.run("segment", cfg, configure, "Segmentation", to_result)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return main(parse_config(argv))


if __name__ == "__main__":
    run_cli(cli)
