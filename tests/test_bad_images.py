"""The intake rule (core.images): other modes converted to RGB and counted (or refused under
``strict``), EXIF orientation applied, folders listed by Pillow's extensions, bad files found by
one pre-scan and listed together, or skipped and counted."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from core.datasets import ImageFolderImages
from core.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    BadImagesError,
    load_rgb,
    probe_image,
)

RNG = np.random.default_rng(0)
PIXELS = (RNG.random((48, 64, 3)) * 255).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_16bit_gray() -> bytes:
    wide = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    return encoded(Image.fromarray(wide), "PNG")


def corrupt_png() -> bytes:
    data = bytearray(encoded(Image.fromarray(PIXELS), "PNG"))
    data[200:300] = bytes(100)  # inside the compressed IDAT stream
    return bytes(data)


def corrupt_jpeg() -> bytes:
    data = bytearray(encoded(Image.fromarray(PIXELS), "JPEG", quality=90))
    data[700:] = RNG.integers(0, 256, len(data) - 700, dtype=np.uint8).tobytes()  # scan data
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encoded(Image.fromarray(PIXELS), "JPEG", quality=90)
    return data[: len(data) * 2 // 3]


# name -> (file bytes, word the error must contain, source mode when it is converted, else None)
BAD = {
    "empty.jpg": (lambda: b"", "empty", None),
    "notes.jpg": (lambda: b"this is a text file, not a photo\n" * 20, "not an image", None),
    "truncated.jpg": (truncated_jpeg, "truncated", None),
    "corrupt.png": (corrupt_png, "corrupt", None),
    "corrupt.jpg": (corrupt_jpeg, "corrupt", None),
    "gray.png": (lambda: encoded(Image.fromarray(PIXELS).convert("L"), "PNG"), "grayscale", "L"),
    "alpha.png": (
        lambda: encoded(Image.fromarray(PIXELS).convert("RGBA"), "PNG"),
        "RGBA",
        "RGBA",
    ),  # fmt: skip
    "wide.png": (png_16bit_gray, "16-bit", "I;16"),
    "cmyk.jpg": (
        lambda: encoded(Image.fromarray(PIXELS).convert("CMYK"), "JPEG"),
        "CMYK",
        "CMYK",
    ),  # fmt: skip
    "float.tif": (
        lambda: encoded(Image.fromarray(PIXELS[..., 0].astype(np.float32)), "TIFF"),
        "floating-point",
        None,
    ),  # fmt: skip
    "tiny.jpg": (lambda: encoded(Image.fromarray(PIXELS[:20, :30]), "JPEG"), "too small", None),
}
CONVERTED = {n: mode for n, (_, _, mode) in BAD.items() if mode}
ALWAYS_BAD = set(BAD) - set(CONVERTED)
MIN_SIZE = 32


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Three good images and one of each bad kind."""
    for i in range(3):
        Image.fromarray(np.roll(PIXELS, i, axis=1)).save(tmp_path / f"good{i}.jpg", quality=95)
    for name, (make, _, _) in BAD.items():
        (tmp_path / name).write_bytes(make())
    return tmp_path


@pytest.mark.parametrize("name", sorted(ALWAYS_BAD))
def test_each_bad_kind_raises_a_clear_error(folder, name):
    word = BAD[name][1]
    with pytest.raises(BadImageError) as err:
        load_rgb(folder / name, min_size=MIN_SIZE)
    assert str(folder / name) in str(err.value) and word in str(err.value)


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_strict_refuses_other_modes_naming_the_key(folder, name):
    with pytest.raises(BadImageError) as err:
        load_rgb(folder / name, strict=True)
    text = str(err.value)
    assert str(folder / name) in text and BAD[name][1] in text and "images.strict=true" in text


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_other_modes_are_converted_to_rgb_by_default(folder, name):
    image = load_rgb(folder / name)
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    if name == "gray.png":  # grey replicated to three equal channels
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    if name == "alpha.png":  # alpha dropped, colours untouched
        assert (image == PIXELS).all()


def test_16bit_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(wide).save(tmp_path / "w.png")
    assert load_rgb(tmp_path / "w.png")[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 64x48 image is seen as 48x64
    Image.fromarray(PIXELS).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    image = load_rgb(tmp_path / "turned.jpg")
    assert image.shape == (64, 48, 3)
    upright = np.asarray(
        Image.open(tmp_path / "turned.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    )
    assert (image == upright).all()


def test_truncated_jpeg_refused_even_if_pil_is_told_to_pad(folder, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError, match="truncated"):
        load_rgb(folder / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_content_decides_format_and_missing_file_is_named(tmp_path):
    Image.fromarray(PIXELS).save(tmp_path / "really_png.jpg", format="PNG")
    assert (load_rgb(tmp_path / "really_png.jpg") == PIXELS).all()  # lossless: it was read as PNG
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        load_rgb(tmp_path / "nothere.jpg")
    with pytest.raises(BadImageError, match="a folder, not an image file"):
        load_rgb(tmp_path)


def test_probe_reads_only_the_header(folder):
    assert probe_image(folder / "good0.jpg") == (64, 48)
    probe_image(folder / "truncated.jpg")  # only a decode can tell (the pre-scan makes one)
    probe_image(folder / "gray.png")
    with pytest.raises(BadImageError, match="grayscale"):
        probe_image(folder / "gray.png", strict=True)


def test_one_prescan_lists_every_bad_file(folder):
    with pytest.raises(BadImagesError) as err:
        ImageFolderImages(folder, 32, train=False, min_size=MIN_SIZE)
    text = str(err.value)
    found = ALWAYS_BAD - {"corrupt.png"}  # its end marker is there: only a full decode tells
    assert text.startswith(f"{folder}: {len(found)} of {len(BAD) + 3} image files are bad: ")
    named = [n for n in sorted(found) if f"{folder / n}: " in text]
    assert len(named) == 5 and f"and {len(found) - 5} more" in text  # the first five by name
    assert "images.skip_bad=true" in text and "\n" not in text


def test_skip_bad_counts_every_bad_file_and_conversions(folder):
    ds = ImageFolderImages(folder, 32, train=False, skip_bad=True, min_size=MIN_SIZE)
    found_at_scan = {Path(f).name for f, _ in ds.skipped}
    assert found_at_scan == ALWAYS_BAD - {"corrupt.png"}
    assert all(reason for _, reason in ds.skipped)
    assert ds.converted == {"L": 1, "RGBA": 1, "I;16": 1, "CMYK": 1}
    intake = ds.intake("split")
    assert intake["images/split/converted"] == 4 and intake["images/split/converted/CMYK"] == 1
    assert intake["images/split/files"] == len(BAD) + 3
    assert intake["images/split/used"] == 3 + len(CONVERTED) + 1  # corrupt.png still listed
    # the one that only a decode reveals is replaced by the next good image and counted
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.uint8 for x in items)
    assert {Path(f).name for f, _ in ds.skipped} == ALWAYS_BAD
    assert len(ds.skipped) == len(ALWAYS_BAD)


def test_strict_folder_names_the_modes_and_both_ways_out(folder):
    for name in ALWAYS_BAD:
        (folder / name).unlink()
    with pytest.raises(BadImagesError) as err:
        ImageFolderImages(folder, 32, train=False, strict=True, min_size=MIN_SIZE)
    text = str(err.value)
    assert f"{len(CONVERTED)} of {len(CONVERTED) + 3} image files are bad" in text
    assert "images.skip_bad=true" in text and "images.strict=false" in text


def test_folder_is_listed_by_pillows_extensions(tmp_path, caplog):
    assert {".jpg", ".png", ".gif", ".pgm", ".webp", ".tif"} <= set(IMAGE_EXTENSIONS)
    assert ".pdf" not in IMAGE_EXTENSIONS  # Pillow writes PDFs but does not open them
    Image.fromarray(PIXELS).convert("P").save(tmp_path / "anim.gif")
    Image.fromarray(PIXELS).convert("L").save(tmp_path / "scan.pgm")
    Image.fromarray(PIXELS).save(tmp_path / "photo.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "meta.xml").write_text("<a/>")
    with caplog.at_level("INFO"):
        ds = ImageFolderImages(tmp_path, 32, train=False)
    assert [Path(f).name for f in ds.files] == ["anim.gif", "photo.JPG", "scan.pgm"]
    assert ds.intake("x")["images/x/not_images"] == 2
    assert "left out 2 files" in caplog.text and "meta.xml, notes.txt" in caplog.text
    assert "converted 1 of 3 images to RGB (L 1)" in caplog.text  # the GIF's palette: lossless


def test_decode_failure_raises_without_skip_bad(tmp_path):
    Image.fromarray(PIXELS).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(corrupt_png())
    ds = ImageFolderImages(tmp_path, 32, train=False)  # the pre-scan passes both
    assert [Path(f).name for f in ds.files] == ["a.png", "b.png"]
    with pytest.raises(BadImageError, match="b.png: corrupt"):
        ds[1]
