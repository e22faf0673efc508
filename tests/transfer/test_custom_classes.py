"""A VOC-format dataset of non-VOC classes keeps its own class names in classification, detection
and segmentation: result.json, meta.json and the mmdet / mmseg metric keys and tables."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core import voc
from core.minivoc import voc_palette

CLASSES = ("tree", "roof")  # classes.txt order (not sorted: roof would come first)
COLOURS = {"tree": (30, 160, 40), "roof": (200, 40, 30)}
N_TRAIN, N_TEST = 12, 6


def _xml(image_id: str, w: int, h: int, objects: list[tuple[str, tuple[int, ...]]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return (f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")  # fmt: skip


def write_custom_voc(root: Path, seed: int = 0) -> Path:
    """A tiny VOC-format set (80x64 JPEGs, XML, ImageSets/Main incl. <cls>_*.txt, Segmentation
    splits, palette SegmentationClass PNGs with value 1 + position in classes.txt)."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation",
                "SegmentationClass"):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    w, h = 80, 64
    ids, present = [], {c: [] for c in CLASSES}
    for k in range(N_TRAIN + N_TEST):
        image_id = f"img{k:03d}"
        img = Image.fromarray(rng.integers(90, 140, (h, w, 3), dtype=np.uint8))
        seg = Image.new("P", (w, h), 0)
        seg.putpalette(voc_palette())
        draw, sdraw = ImageDraw.Draw(img), ImageDraw.Draw(seg)
        names = [CLASSES[k % 2]] + ([CLASSES[(k + 1) % 2]] if k % 3 == 0 else [])
        objects = []
        for j, name in enumerate(names):
            x0, y0 = int(rng.integers(2, 30)) + 38 * j, int(rng.integers(2, 20))
            x1, y1 = x0 + int(rng.integers(14, 24)), y0 + int(rng.integers(16, 30))
            x1, y1 = min(x1, w - 2), min(y1, h - 2)
            draw.rectangle((x0, y0, x1, y1), fill=COLOURS[name])
            sdraw.rectangle((x0, y0, x1, y1), fill=CLASSES.index(name) + 1)
            objects.append((name, (x0 + 1, y0 + 1, x1 + 1, y1 + 1)))  # VOC: 1-based inclusive
        img.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        seg.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, w, h, objects))
        ids.append(image_id)
        for c in CLASSES:
            present[c].append(c in names)
    splits = {"train": ids[:N_TRAIN], "trainval": ids[:N_TRAIN], "val": ids[N_TRAIN:],
              "test": ids[N_TRAIN:]}  # fmt: skip
    for split, members in splits.items():
        for task in ("Main", "Segmentation"):
            (root / "ImageSets" / task / f"{split}.txt").write_text("\n".join(members) + "\n")
        for c in CLASSES:
            lines = [f"{i} {1 if present[c][ids.index(i)] else -1}" for i in members]
            (root / "ImageSets" / "Main" / f"{c}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def custom_voc(tmp_path_factory) -> Path:
    return write_custom_voc(tmp_path_factory.mktemp("custom") / "VOC2007")


def _common(custom_voc, ckpt, run_dir):
    return [f"--checkpoint={ckpt}", f"--data={custom_voc}", f"run_dir={run_dir}", "threads=1",
            "progress=false"]  # fmt: skip


def table_classes(run_dir: Path) -> set[str]:
    """Row names of the per-class tables mmdet / mmseg print in the work dir's log; the resolved
    config that mmengine also logs names only the dataset's classes."""
    log = "\n".join(p.read_text() for p in (run_dir / "work").rglob("*.log"))
    assert "aeroplane" not in log
    rows = re.findall(r"^\|\s*([A-Za-z_]\w*)\s*\|", log, flags=re.M)
    return set(rows) - {"class", "Class", "mAP"}


def test_class_order_comes_from_classes_txt(custom_voc, tmp_path):
    assert voc.class_names(custom_voc) == CLASSES
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    for c in CLASSES:
        (tmp_path / "ImageSets" / "Main" / f"{c}_train.txt").write_text("a 1\n")
    assert voc.class_names(tmp_path) == ("roof", "tree")  # no classes.txt: non-VOC names sorted
    (tmp_path / "classes.txt").write_text("tree\nroof\ntree\n")
    with pytest.raises(voc.VOCFormatError, match=r"classes.txt: repeated classes \['tree'\]"):
        voc.class_names(tmp_path)


def test_classify_keeps_the_dataset_classes(custom_voc, ckpt, tmp_path):
    from transfer import classify

    args = [*_common(custom_voc, ckpt, tmp_path / "cls"), "modes=[finetune]",
            "finetune.epochs=1", "finetune.batch_size=4"]  # fmt: skip
    result = classify.main(classify.parse_config(args))
    assert {k for k in result if "_AP_" in k} == {"finetune_AP_tree", "finetune_AP_roof"}
    assert json.loads((tmp_path / "cls" / "meta.json").read_text())["classes"] == list(CLASSES)


def test_detect_keeps_the_dataset_classes(custom_voc, ckpt, tmp_path):
    from transfer import detect

    args = [*_common(custom_voc, ckpt, tmp_path / "det"), "max_iters=2", "batch_size=2",
            "warmup_iters=1"]  # fmt: skip
    result = detect.main(detect.parse_config(args))
    assert {k for k in result if k.startswith("AP_")} == {"AP_tree", "AP_roof"}
    assert json.loads((tmp_path / "det" / "result.json").read_text()).keys() == result.keys()
    assert json.loads((tmp_path / "det" / "meta.json").read_text())["classes"] == list(CLASSES)
    # mmdet's evaluation table (in the work dir's log) names the dataset's classes, not VOC's.
    assert table_classes(tmp_path / "det") == {"tree", "roof"}


def test_segment_keeps_the_dataset_classes(custom_voc, ckpt, tmp_path):
    from transfer import segment

    args = [*_common(custom_voc, ckpt, tmp_path / "seg"), "max_iters=2", "batch_size=2",
            "warmup_iters=1", "crop_size=48"]  # fmt: skip
    result = segment.main(segment.parse_config(args))
    ious = {k for k in result if k.startswith("IoU_")}
    assert ious == {"IoU_background", "IoU_tree", "IoU_roof"}
    assert table_classes(tmp_path / "seg") == {"background", "tree", "roof"}


def test_segment_labels_index_the_dataset_classes(custom_voc):
    """PNG value v = classes[v - 1] reaches mmseg unchanged (no VOC label map)."""
    from mmseg.datasets import BaseSegDataset  # noqa: F401  (registers the datasets)
    from mmseg.registry import DATASETS

    import transfer.mm_backbone  # noqa: F401
    from transfer.segment import seg_dataset_type, seg_metainfo

    ds = DATASETS.build(dict(
        data_root=str(custom_voc), ann_file="ImageSets/Segmentation/train.txt",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        metainfo=seg_metainfo(CLASSES), pipeline=[dict(type="LoadAnnotations")],
        **seg_dataset_type(CLASSES),
    ))  # fmt: skip
    assert ds.metainfo["classes"] == ("background", *CLASSES)
    labels = ds[0]["gt_seg_map"]
    png = np.asarray(Image.open(custom_voc / "SegmentationClass" / "img000.png"))
    assert np.array_equal(labels, png) and set(np.unique(png)) == {0, 1, 2}
