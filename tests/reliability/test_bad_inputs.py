"""A bad-input corpus at the run level: ``python -m pretext.train`` on a mini-VOC holding one bad
file exits 2 with one line naming the file and the problem; with ``images.skip_bad=true`` the run
finishes and its log counts what was skipped; 16-bit and CMYK images are converted and counted in
result.json, or refused with ``images.strict=true``. VOC XML problems go through the classification
transfer, the stage that reads annotations.

Loader-level checks of the same files (and more: alpha, grayscale, float TIFF, corrupt PNG, convert)
are in tests/test_bad_images.py and tests/test_datasets.py.
"""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from core.checkpoint import save_checkpoint
from core.models import build_model
from core.voc import VOCFormatError
from transfer import classify


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(h * w).random((h, w, 3)) * 255).astype(np.uint8))


def truncated(path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) * 2 // 3]


# name -> (bytes of the bad JPEGImages/<id>.jpg given the good file, words the error must hold)
BAD_IMAGES = {
    "truncated_jpeg": (truncated, "truncated image data"),
    "zero_bytes": (lambda p: b"", "empty file (0 bytes)"),
    "one_pixel": (lambda p: encoded(rgb(1, 1), "JPEG"), "too small: 1x1"),
    "below_min_size": (lambda p: encoded(rgb(24, 40), "JPEG"), "too small: 40x24"),
}
# converted to RGB by default (counted per mode), refused under images.strict=true
CONVERTED = {
    "png_16bit": (
        lambda p: encoded(Image.fromarray(np.full((80, 90), 40000, np.uint16)), "PNG"),
        "16-bit image",
        "I;16",
    ),
    "cmyk_jpeg": (lambda p: encoded(rgb(80, 90).convert("CMYK"), "JPEG"), "CMYK image", "CMYK"),
}
# accepted on purpose: the bytes decide the format; 40 px is upsampled to the 64-px crop (>= 32)
GOOD_SURPRISES = {
    "png_named_jpg": lambda p: encoded(Image.open(p).convert("RGB"), "PNG"),
    "smaller_than_crop": lambda p: encoded(rgb(40, 48), "JPEG"),
}


@pytest.fixture()
def voc(tiny_voc, tmp_path):
    """A writable copy of the tiny mini-VOC; returns (root, train ids)."""
    root = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc, root)
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    return root, ids


def pretext_cli(fork_server, voc_root, run_dir, *extra):
    args = [f"data.root={voc_root}", f"run_dir={run_dir}", "data.num_workers=0",
            "optim.batch_size=8", "optim.steps=2", "optim.warmup_steps=1", "eval_images=4",
            "threads=1", "mask.kind=central", *extra]  # fmt: skip
    pid, log = fork_server.start("pretext.train", args)
    return fork_server.wait(pid), log.read_text()


def error_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_stops_the_run_naming_file_and_problem(fork_server, voc, tmp_path, kind):
    root, ids = voc
    path = root / "JPEGImages" / f"{ids[3]}.jpg"
    make, words = BAD_IMAGES[kind]
    path.write_bytes(make(path))
    rc, text = pretext_cli(fork_server, root, tmp_path / "run")
    assert rc == 2
    line = error_line(text)
    assert str(path) in line and words in line, line


@pytest.mark.parametrize("kind", sorted(CONVERTED))
def test_other_modes_are_refused_under_strict(fork_server, voc, tmp_path, kind):
    root, ids = voc
    path = root / "JPEGImages" / f"{ids[3]}.jpg"
    make, words, _ = CONVERTED[kind]
    path.write_bytes(make(path))
    rc, text = pretext_cli(fork_server, root, tmp_path / "run", "images.strict=true")
    assert rc == 2
    line = error_line(text)
    assert str(path) in line and words in line and "images.strict=false" in line, line
    assert not (tmp_path / "run").exists()  # found before anything was written


def test_skip_bad_skips_and_counts_every_bad_image(fork_server, voc, tmp_path):
    root, ids = voc
    bad = []
    for k, (make, _) in enumerate(BAD_IMAGES.values()):
        path = root / "JPEGImages" / f"{ids[k]}.jpg"
        path.write_bytes(make(path))
        bad.append(path)
    rc, text = pretext_cli(fork_server, root, tmp_path / "run0")
    assert rc == 2  # all of them in one line, found by one pre-scan
    line = error_line(text)
    assert f"{len(bad)} of {len(ids)} image files are bad" in line
    assert all(str(p) in line for p in bad) and "images.skip_bad=true" in line
    for k, make in enumerate(GOOD_SURPRISES.values(), start=len(bad)):
        path = root / "JPEGImages" / f"{ids[k]}.jpg"
        path.write_bytes(make(path))
    start = len(bad) + len(GOOD_SURPRISES)
    for k, (make, _, _) in enumerate(CONVERTED.values(), start=start):
        path = root / "JPEGImages" / f"{ids[k]}.jpg"
        path.write_bytes(make(path))
    rc, text = pretext_cli(fork_server, root, tmp_path / "run", "images.skip_bad=true")
    assert rc == 0, text[-3000:]
    assert f"skipped {len(bad)} of {len(ids)} images as bad" in text  # one line, each named
    assert all(f"{p.name}: " in text for p in bad)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (result["skipped_train_images"], result["skipped_eval_images"]) == (len(bad), 0)
    assert result["images/train/skipped_bad"] == len(bad)
    assert result["images/train/used"] == len(ids) - len(bad)
    for _, _, mode in CONVERTED.values():
        assert result[f"images/train/converted/{mode}"] == 1
    assert result["images/train/converted"] == len(CONVERTED)


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda r: (r / "ImageSets/Main/train.txt").write_text(""),
            "train.txt: split file is empty",
        ),
        (lambda r: (r / "ImageSets/Main/train.txt").unlink(), "train.txt: split file not found"),
    ],
    ids=["empty_split", "missing_split"],
)
def test_split_file_problems(fork_server, voc, tmp_path, damage, words):
    root, _ = voc
    damage(root)
    rc, text = pretext_cli(fork_server, root, tmp_path / "run")
    assert rc == 2 and words in error_line(text)


def test_segmentation_png_of_the_wrong_size(fork_server, voc, tmp_path):
    root, _ = voc
    png = sorted((root / "SegmentationObject").glob("*.png"))[0]
    with Image.open(png) as im:
        im.resize((im.width // 2, im.height // 2), Image.Resampling.NEAREST).save(png)
    # random-region holes take their shapes from SegmentationObject
    rc, text = pretext_cli(fork_server, root, tmp_path / "run", "mask.kind=random_region")
    assert rc == 2
    line = error_line(text)
    assert str(png) in line and "differs from its image" in line, line


# ---- VOC annotations: read by the classification transfer ------------------------------------


def ann_damage(text: str, kind: str) -> str | None:
    if kind == "malformed":
        return text.replace("</annotation>", "")
    if kind == "unknown_class":
        return text.replace("<name>", "<name>unicorn", 1)
    if kind == "box_outside":
        start = text.index("<xmax>") + len("<xmax>")
        return text[:start] + "99999" + text[text.index("</xmax>") :]
    return None  # missing


@pytest.mark.parametrize(
    "kind, error, words",
    [
        ("malformed", VOCFormatError, "malformed XML"),
        ("missing", FileNotFoundError, "annotation file not found"),
        ("unknown_class", VOCFormatError, "unknown class 'unicorn"),
        ("box_outside", VOCFormatError, "lies outside the"),
    ],
)
def test_bad_annotation_stops_the_transfer_naming_file_and_problem(
    voc, tmp_path, kind, error, words
):
    root, _ = voc
    ids = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    xml = root / "Annotations" / f"{ids[5]}.xml"
    damaged = ann_damage(xml.read_text(), kind)
    if damaged is None:
        xml.unlink()
    else:
        xml.write_text(damaged)
    ckpt = tmp_path / "ce.pt"
    save_checkpoint(ckpt, {
        "method": "context_encoder", "arch": "small64", "output": "full", "dropout": 0.0,
        "model": build_model("small64").state_dict(), "discriminator": None, "optimizers": {},
        "step": 0, "rng": {}, "data_mean": [0.0] * 3, "config": {}, "elapsed_s": 0.0,
    })  # fmt: skip
    cfg = classify.parse_config([f"--checkpoint={ckpt}", f"--data={root}",
                                 f"run_dir={tmp_path / 'cls'}", "progress=false", "threads=1"])  # fmt: skip
    with pytest.raises(error) as err:
        classify.main(cfg)
    assert str(xml) in str(err.value) and words in str(err.value), str(err.value)
