"""Bad image files: a clear BadImageError naming the file and the problem, or skipped and counted."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from core.datasets import ImageFolderImages
from core.images import BadImageError, load_rgb, probe_image

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


# name -> (file bytes, word the error must contain, whether convert=True makes it loadable)
BAD = {
    "empty.jpg": (lambda: b"", "empty", False),
    "notes.jpg": (lambda: b"this is a text file, not a photo\n" * 20, "not an image", False),
    "truncated.jpg": (truncated_jpeg, "truncated", False),
    "corrupt.png": (corrupt_png, "corrupt", False),
    "corrupt.jpg": (corrupt_jpeg, "corrupt", False),
    "gray.png": (lambda: encoded(Image.fromarray(PIXELS).convert("L"), "PNG"), "grayscale", True),
    "alpha.png": (lambda: encoded(Image.fromarray(PIXELS).convert("RGBA"), "PNG"), "RGBA", True),
    "wide.png": (png_16bit_gray, "16-bit", True),
    "cmyk.jpg": (lambda: encoded(Image.fromarray(PIXELS).convert("CMYK"), "JPEG"), "CMYK", True),
    "float.tif": (
        lambda: encoded(Image.fromarray(PIXELS[..., 0].astype(np.float32)), "TIFF"),
        "floating-point",
        False,
    ),  # fmt: skip
    "tiny.jpg": (lambda: encoded(Image.fromarray(PIXELS[:20, :30]), "JPEG"), "too small", False),
}
MIN_SIZE = 32


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Three good images and one of each bad kind."""
    for i in range(3):
        Image.fromarray(np.roll(PIXELS, i, axis=1)).save(tmp_path / f"good{i}.jpg", quality=95)
    for name, (make, _, _) in BAD.items():
        (tmp_path / name).write_bytes(make())
    return tmp_path


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_kind_raises_a_clear_error(folder, name):
    word = BAD[name][1]
    with pytest.raises(BadImageError) as err:
        load_rgb(folder / name, min_size=MIN_SIZE)
    assert str(folder / name) in str(err.value) and word in str(err.value)


@pytest.mark.parametrize("name", sorted(n for n, v in BAD.items() if v[2]))
def test_convert_turns_other_modes_into_rgb(folder, name):
    image = load_rgb(folder / name, convert=True)
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    if name == "gray.png":  # grey replicated to three equal channels
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    if name == "alpha.png":  # alpha dropped, colours untouched
        assert (image == PIXELS).all()


def test_16bit_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(wide).save(tmp_path / "w.png")
    assert load_rgb(tmp_path / "w.png", convert=True)[0, :, 0].tolist() == [0, 1, 128, 255]


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


def test_probe_reads_only_the_header(folder):
    assert probe_image(folder / "good0.jpg") == (64, 48)
    probe_image(folder / "truncated.jpg")  # only a full decode can tell
    with pytest.raises(BadImageError, match="grayscale"):
        probe_image(folder / "gray.png")


def test_skip_bad_counts_every_bad_file(folder):
    with pytest.raises(BadImageError):
        ImageFolderImages(folder, 32, train=False, min_size=MIN_SIZE)
    ds = ImageFolderImages(folder, 32, train=False, skip_bad=True, min_size=MIN_SIZE)
    found_at_scan = {Path(f).name for f, _ in ds.skipped}
    assert found_at_scan == set(BAD) - {"truncated.jpg", "corrupt.jpg", "corrupt.png"}
    assert all(reason for _, reason in ds.skipped)
    # the three that only a decode reveals are replaced by the next good image and counted
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.uint8 for x in items)
    assert {Path(f).name for f, _ in ds.skipped} == set(BAD)
    assert len(ds.skipped) == len(BAD)


def test_decode_failure_raises_without_skip_bad(tmp_path):
    Image.fromarray(PIXELS).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(truncated_jpeg())
    ds = ImageFolderImages(tmp_path, 32, train=False)  # the header scan passes both
    assert [Path(f).name for f in ds.files] == ["a.jpg", "b.jpg"]
    with pytest.raises(BadImageError, match="b.jpg: truncated"):
        ds[1]
