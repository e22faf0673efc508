"""MiniVOC: determinism, VOC format faithfulness and agreement between its annotations."""

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import minivoc, voc

N = 24


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Seed 0 drawn twice, once in one process and once with two workers."""
    a = minivoc.generate(tmp_path_factory.mktemp("a"), n_images=N, seed=0, workers=1)
    b = minivoc.generate(tmp_path_factory.mktemp("b"), n_images=N, seed=0, workers=2)
    return a, b


def test_same_seed_is_byte_identical_and_other_seed_differs(two_runs, tmp_path):
    a, b = two_runs
    ha, hb = tree_hashes(a), tree_hashes(b)
    assert len(ha) > 3 * N and ha == hb
    c = minivoc.generate(tmp_path, n_images=N, seed=1, workers=1)
    hc = tree_hashes(c)
    jpgs = [k for k in ha if k.startswith("JPEGImages/")]
    assert sum(ha[k] != hc.get(k) for k in jpgs) == len(jpgs)


def test_layout_and_splits(two_runs):
    root = two_runs[0]
    ids = [f"{i + 1:06d}" for i in range(N)]
    assert sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg")) == ids
    assert sorted(p.stem for p in (root / "Annotations").glob("*.xml")) == ids
    split = {s: voc.read_split(root, s) for s in ("train", "val", "trainval", "test")}
    assert set(split["train"]).isdisjoint(split["val"]) and set(split["trainval"]).isdisjoint(split["test"])  # fmt: skip
    assert sorted(split["train"] + split["val"]) == split["trainval"]
    assert sorted(split["trainval"] + split["test"]) == ids
    assert len(split["train"]) == N // 2 and len(split["val"]) == N // 4
    seg = voc.read_split(root, "trainval", "Segmentation")
    assert set(seg) <= set(split["trainval"]) and 0 < len(seg) < len(split["trainval"])
    assert sorted(voc.read_split(root, "train", "Segmentation") + voc.read_split(root, "val", "Segmentation")) == seg  # fmt: skip
    for sub in ("SegmentationClass", "SegmentationObject"):  # PNGs exactly for the subset, like VOC
        assert sorted(p.stem for p in (root / sub).glob("*.png")) == seg


def test_annotations_are_valid_and_cover_the_classes(two_runs):
    root = two_runs[0]
    assert voc.class_names(root) == minivoc.CLASSES == voc.VOC_CLASSES[:8]
    seen, per_image = set(), {}
    for image_id in voc.read_split(root, "trainval") + voc.read_split(root, "test"):
        ann = voc.parse_annotation(root / "Annotations" / f"{image_id}.xml", minivoc.CLASSES)
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.mode == "RGB" and im.size == (ann.width, ann.height)
            assert min(im.size) >= 96 and max(im.size) <= 160
        assert 1 <= len(ann.objects) <= 4
        for o in ann.objects:  # parse_annotation already refuses boxes outside the image
            xmin, ymin, xmax, ymax = o.bbox
            assert 1 <= xmin < xmax <= ann.width and 1 <= ymin < ymax <= ann.height
        seen |= {o.name for o in ann.objects}
        per_image[image_id] = ann
    assert len(seen) >= 6
    # per-class lists: " 1" has a non-difficult object, " 0" only difficult ones, "-1" none
    for name in minivoc.CLASSES:
        for line in (root / "ImageSets" / "Main" / f"{name}_trainval.txt").read_text().splitlines():
            image_id, flag = line[:6], int(line[6:])
            flags = [o.difficult for o in per_image[image_id].objects if o.name == name]
            assert flag == (-1 if not flags else 0 if all(flags) else 1)


def test_segmentation_agrees_with_annotations(two_runs):
    root = two_runs[0]
    for image_id in voc.read_split(root, "trainval", "Segmentation"):
        ann = voc.parse_annotation(root / "Annotations" / f"{image_id}.xml", minivoc.CLASSES)
        obj_png = Image.open(root / "SegmentationObject" / f"{image_id}.png")
        cls_png = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        assert obj_png.mode == cls_png.mode == "P"
        assert obj_png.getpalette()[: 3 * 3] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colour map
        inst, cls = np.asarray(obj_png), np.asarray(cls_png)
        assert inst.shape == cls.shape == (ann.height, ann.width)
        assert ((inst == 255) == (cls == 255)).all() and ((inst == 0) == (cls == 0)).all()
        assert (inst == 255).any()  # the void outline
        assert sorted(set(np.unique(inst)) - {0, 255}) == list(range(1, len(ann.objects) + 1))
        for i, o in enumerate(ann.objects, 1):
            assert set(np.unique(cls[inst == i])) == {voc.VOC_CLASSES.index(o.name) + 1}
            ys, xs = np.nonzero(inst == i)
            xmin, ymin, xmax, ymax = o.bbox
            assert xmin - 1 <= xs.min() and xs.max() <= xmax - 1
            assert ymin - 1 <= ys.min() and ys.max() <= ymax - 1


def test_generate_is_idempotent_and_regenerates_for_other_parameters(tmp_path):
    root = minivoc.generate(tmp_path, n_images=8, seed=3, workers=1)
    stamp_mtime = (root / minivoc.STAMP).stat().st_mtime_ns
    start = time.perf_counter()
    assert minivoc.generate(tmp_path, n_images=8, seed=3, workers=1) == root
    assert time.perf_counter() - start < 0.5
    assert (root / minivoc.STAMP).stat().st_mtime_ns == stamp_mtime
    minivoc.generate(tmp_path, n_images=12, seed=3, workers=1)
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 12
    assert not list(tmp_path.glob(".VOC2007*"))  # no temporary trees left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "VOC2007").mkdir()
    (tmp_path / "VOC2007" / "mine.txt").write_text("not minivoc")
    with pytest.raises(FileExistsError, match="VOC2007"):
        minivoc.generate(tmp_path, n_images=8, workers=1)


def test_cli(tmp_path):
    voc_root = minivoc.main(["--out", str(tmp_path), "--n-images", "6", "--workers", "1"])
    assert voc_root == tmp_path / "VOC2007" and len(voc.read_split(voc_root, "trainval")) == 5


def test_no_mm_libraries_imported():
    code = (
        "import sys, core.minivoc, core.images, core.voc, core.datasets\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmseg', 'mmcv', 'mmengine')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.slow
def test_default_size_generation_time(tmp_path):
    start = time.perf_counter()
    root = minivoc.generate(tmp_path)
    seconds = time.perf_counter() - start
    print(f"MiniVOC default ({minivoc.DEFAULT_N_IMAGES} images): {seconds:.1f} s")
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == minivoc.DEFAULT_N_IMAGES
    assert seconds < 180  # loose: ~17 s on the 2-core dev machine
