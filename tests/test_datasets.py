"""VOC parsing (errors name the file), object shapes, and the torch image datasets."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from core import voc
from core.datasets import (
    ImageFolderImages,
    VOCClassification,
    VOCImages,
    eval_view,
    train_view,
)
from core.minivoc import CLASSES

XML = """<annotation><filename>x.jpg</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{xmin}</xmin><ymin>5</ymin><xmax>{xmax}</xmax><ymax>60</ymax></bndbox></object>
</annotation>"""


def write_xml(tmp_path: Path, name="car", xmin=10, xmax=50, difficult=0) -> Path:
    path = tmp_path / "x.xml"
    path.write_text(XML.format(name=name, xmin=xmin, xmax=xmax, difficult=difficult))
    return path


# ------------------------------------------------------------------------------------ voc.py
def test_parse_annotation_reads_voc_fields(tmp_path):
    ann = voc.parse_annotation(write_xml(tmp_path, xmin=1, xmax=100, difficult=1), CLASSES)
    assert (ann.width, ann.height) == (100, 80)
    assert ann.objects == [voc.Object("car", (1, 5, 100, 60), difficult=True)]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (dict(name="unicorn"), "unknown class 'unicorn'"),
        (dict(xmax=101), "outside the 100x80 image"),
        (dict(xmin=0), "outside the 100x80 image"),
        (dict(xmin=50, xmax=40), "degenerate box"),
    ],
)
def test_parse_annotation_errors_name_file_and_problem(tmp_path, kwargs, problem):
    path = write_xml(tmp_path, **kwargs)
    with pytest.raises(voc.VOCFormatError) as err:
        voc.parse_annotation(path, CLASSES)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_malformed_and_missing_xml(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size><width>3</width></annotation")
    with pytest.raises(voc.VOCFormatError, match=r"bad\.xml: malformed XML"):
        voc.parse_annotation(bad, CLASSES)
    with pytest.raises(FileNotFoundError, match=r"gone\.xml"):
        voc.parse_annotation(tmp_path / "gone.xml", CLASSES)


def test_split_errors(tmp_path):
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("\n\n")
    with pytest.raises(voc.VOCFormatError, match=r"Main/train\.txt: split file is empty"):
        voc.read_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"Main/val\.txt"):
        voc.read_split(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="no per-class"):
        voc.class_names(tmp_path)


def test_object_shapes_match_segmentation_pngs(tiny_voc):
    shapes = voc.object_shapes(tiny_voc, min_pixels=1)
    expected = 0
    for image_id in voc.read_split(tiny_voc, "trainval", "Segmentation"):
        inst = np.asarray(Image.open(tiny_voc / "SegmentationObject" / f"{image_id}.png"))
        expected += len(set(np.unique(inst)) - {0, 255})
    assert len(shapes) == expected > 0
    for s in shapes:  # tight crops of a non-empty bool mask
        assert s.dtype == bool and s[0].any() and s[-1].any() and s[:, 0].any() and s[:, -1].any()
    assert len(voc.object_shapes(tiny_voc, max_shapes=3)) == 3


def test_object_shapes_wrong_png_size(tiny_voc, tmp_path):
    root = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc, root)
    image_id = voc.read_split(root, "trainval", "Segmentation")[0]
    png = root / "SegmentationObject" / f"{image_id}.png"
    im = Image.open(png)
    im.crop((0, 0, im.width - 3, im.height)).save(png)
    with pytest.raises(voc.VOCFormatError, match=rf"{image_id}\.png: size .* differs"):
        voc.object_shapes(root)


@pytest.fixture(scope="module")
def voc2012_layout(tiny_voc, tmp_path_factory) -> Path:
    """tiny_voc rewritten with VOC2012 names: 2008_xxxxxx ids, no test split."""
    root = tmp_path_factory.mktemp("devkit") / "VOC2012"
    rename = {i: f"2008_{i}" for i in voc.read_split(tiny_voc, "trainval")}
    for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "xml"), ("SegmentationObject", "png")):
        (root / sub).mkdir(parents=True)
        for old, new in rename.items():
            if (tiny_voc / sub / f"{old}.{ext}").exists():
                shutil.copy(tiny_voc / sub / f"{old}.{ext}", root / sub / f"{new}.{ext}")
    for task in ("Main", "Segmentation"):
        (root / "ImageSets" / task).mkdir(parents=True)
        for f in (tiny_voc / "ImageSets" / task).glob("*.txt"):
            if "test" not in f.name:
                lines = [rename[ln[:6]] + ln[6:] for ln in f.read_text().splitlines()]
                (root / "ImageSets" / task / f.name).write_text("\n".join(lines) + "\n")
    return root


def test_voc2012_layout(voc2012_layout):
    root = voc2012_layout
    assert voc.class_names(root) == CLASSES
    ds = VOCClassification(root, "val", 32, train=False)
    assert ds.ids[0].startswith("2008_") and len(ds) == len(voc.read_split(root, "val"))
    assert len(voc.object_shapes(root)) > 0
    with pytest.raises(FileNotFoundError, match="test.txt"):
        VOCImages(root, "test", 32, train=False)


# ------------------------------------------------------------------------------- datasets.py
def test_voc_images_items(tiny_voc):
    for train in (True, False):
        ds = VOCImages(tiny_voc, "train", 64, train=train)
        assert len(ds) == len(voc.read_split(tiny_voc, "train")) and not ds.skipped
        x = ds[0]
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and x.float().std() > 5


def test_eval_view_is_the_centre_crop():
    image = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    assert (eval_view(image, 40) == image[:, 10:50]).all()
    assert eval_view(image, 20).shape == (20, 20, 3)


def test_train_view_is_a_crop_of_scale_and_ratio_then_a_flip_drawn_from_torch_rng():
    """Oracle: the crop box from torch's RNG as RandomResizedCrop draws it (10 tries of uniform
    area and log-uniform aspect, then randint top / left), PIL bilinear resize, flip if rand < 0.5."""
    import math

    rng = np.random.default_rng(0)
    for shape in [(120, 160), (300, 90), (41, 40)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        height, width = shape
        for seed in range(20):
            torch.manual_seed(seed)
            for _ in range(10):
                area = height * width * torch.empty(1).uniform_(0.4, 1.0).item()
                aspect = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3)).item())
                w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = int(torch.randint(0, height - h + 1, (1,)))
                    left = int(torch.randint(0, width - w + 1, (1,)))
                    break
            else:
                continue  # the fallback box (rare) is torchvision's business
            crop = Image.fromarray(image[top : top + h, left : left + w])
            expected = np.asarray(crop.resize((32, 32), Image.Resampling.BILINEAR))
            if torch.rand(1).item() < 0.5:
                expected = expected[:, ::-1]
            after = torch.rand(1)
            torch.manual_seed(seed)
            assert (train_view(image, 32) == expected).all(), (shape, seed)
            assert torch.rand(1) == after  # the same number of draws


def test_train_views_follow_torch_rng(tiny_voc):
    ds = VOCImages(tiny_voc, "train", 48, train=True)

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([ds[i] for i in range(4)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    eval_ds = VOCImages(tiny_voc, "train", 48, train=False)
    assert torch.equal(eval_ds[0], eval_ds[0])


def test_seeded_dataloader_reproduces_crops(tiny_voc):
    ds = VOCImages(tiny_voc, "train", 32, train=True)

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, generator=gen)
        return torch.cat(list(loader))

    a = batches(0)
    assert torch.equal(a, batches(0))
    assert not torch.equal(a, batches(1))


def test_voc_classification_labels(tiny_voc):
    ds = VOCClassification(tiny_voc, "trainval", 32, train=False, class_names=CLASSES)
    assert ds.class_names == CLASSES
    for i in range(len(ds)):
        image, labels, difficult_only = ds[i]
        assert image.shape == (3, 32, 32) and labels.shape == difficult_only.shape == (
            len(CLASSES),
        )
        ann = voc.parse_annotation(tiny_voc / "Annotations" / f"{ds.ids[i]}.xml", CLASSES)
        easy = {o.name for o in ann.objects if not o.difficult}
        hard = {o.name for o in ann.objects if o.difficult} - easy
        assert {CLASSES[c] for c in labels.nonzero().flatten().tolist()} == easy
        assert {CLASSES[c] for c in difficult_only.nonzero().flatten().tolist()} == hard
    # the per-class " 0" entries of the VOC files are exactly the difficult-only ones
    zeros = sum(
        line.endswith(" 0")
        for c in CLASSES
        for line in (tiny_voc / "ImageSets/Main" / f"{c}_trainval.txt").read_text().splitlines()
    )
    assert ds.difficult_only.sum().item() == zeros
    with pytest.raises(ValueError, match="do not match"):
        VOCClassification(tiny_voc, "train", 32, train=False, class_names=voc.VOC_CLASSES)


def test_image_folder_is_recursive(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        (tmp_path / wnid).mkdir()
        for k in range(2):
            pixels = (rng.random((50, 70, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / wnid / f"{wnid}_{k}.JPEG")
    (tmp_path / "n01" / "readme.txt").write_text("not an image")
    (tmp_path / "n01" / ".hidden.jpg").write_bytes(b"")
    ds = ImageFolderImages(tmp_path, 40, train=True)
    assert [Path(f).name for f in ds.files] == ["n01_0.JPEG", "n01_1.JPEG", "n02_0.JPEG", "n02_1.JPEG"]  # fmt: skip
    assert ds[3].shape == (3, 40, 40)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match="no image files .*; found only a.txt"):
        ImageFolderImages(tmp_path / "docs", 40, train=True)


def test_too_small_for_the_view(tmp_path):
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((90, 90, 3), np.uint8)).save(tmp_path / "fine.png")
    with pytest.raises(ValueError, match=r"small\.png: too small: 30x30"):
        ImageFolderImages(tmp_path, 64, train=False)  # default min_size = 64 // 2
    ds = ImageFolderImages(tmp_path, 64, train=False, skip_bad=True)
    assert len(ds) == 1 and [Path(f).name for f, _ in ds.skipped] == ["small.png"]
    assert len(ImageFolderImages(tmp_path, 64, train=False, min_size=0)) == 2
