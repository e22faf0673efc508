"""Safe image decoding: every image the pretext stage reads goes through ``load_rgb``.

Policy (``convert=False``, the default): only 8-bit RGB images are accepted, plus palette images
without transparency (mode P; their RGB conversion loses nothing). Anything else raises
``BadImageError`` whose message starts with the file and names the problem:

    zero-byte file, not an image, truncated or corrupt data (decoded in full, never padded:
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off while decoding), grayscale (L, 1, LA),
    alpha (RGBA, PA, P with transparency), CMYK, 16-bit (I;16*, I, 48-bit RGB PNGs), float (F),
    other modes, and images whose short side is below ``min_size``.

With ``convert=True`` (what ImageNet needs: it holds CMYK and grayscale JPEGs) those modes are
converted to RGB by one documented rule each: grayscale is replicated to 3 channels, alpha is
dropped (as ``PIL.Image.convert('RGB')`` and torchvision's ImageFolder loader do), CMYK goes
through PIL's conversion (no ICC profile), 16-bit is scaled to 8 bits (v * 255 / 65535, rounded;
48-bit RGB PNGs keep the high byte, which is what PIL decodes). Float images always error.

The file's bytes decide its format, not its extension: a PNG named ``.jpg`` (ImageNet has one) loads
as a PNG; a file that is no image at all errors. EXIF orientation is not applied (torchvision's
convention, which published ImageNet numbers use).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from core.cli import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
GRAYSCALE_MODES = ("L", "1", "LA", "La")
ALPHA_MODES = ("RGBA", "RGBa", "PA")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class BadImageError(UserError):
    """An image file that cannot be used; the message is '<path>: <problem>'."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@contextlib.contextmanager
def _no_truncated_loads() -> Iterator[None]:
    # someone else may have switched it on globally; a padded half image must not pass as data
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _sixteen_bit_mode(im: Image.Image) -> str | None:
    """The 16-bit mode of ``im`` ('I;16', or the raw mode 'RGB;16B' PIL reads as 8-bit RGB)."""
    if im.mode in SIXTEEN_BIT_MODES:
        return im.mode
    for tile in im.tile:
        raw = tile[3] if isinstance(tile[3], str) else (tile[3] or ("",))[0]
        if isinstance(raw, str) and ";16" in raw:
            return raw
    return None


def mode_problem(im: Image.Image, convert: bool) -> str | None:
    """Why ``im`` (opened, maybe not decoded) is refused under the policy above; None if usable."""
    mode = im.mode
    if mode == "F" or mode.startswith("F;"):
        return f"floating-point image (mode {mode}) not supported"
    wide = _sixteen_bit_mode(im)
    if wide:
        return None if convert else f"16-bit image (mode {wide}) not supported; use convert=True"
    if mode == "RGB" or (mode == "P" and "transparency" not in im.info):
        return None
    if convert:
        return None
    if mode in GRAYSCALE_MODES:
        kind = "grayscale"
    elif mode in ALPHA_MODES or mode == "P":
        kind = "RGBA/alpha"
    elif mode == "CMYK":
        kind = "CMYK"
    else:
        kind = "non-RGB"
    return f"{kind} image (mode {mode}) not accepted; use convert=True to convert it to RGB"


def _size_problem(width: int, height: int, min_size: int) -> str | None:
    if min(width, height) < min_size:
        return f"too small: {width}x{height}, short side < min_size {min_size}"
    return None


def probe_image(path: str | Path, min_size: int = 0, convert: bool = False) -> tuple[int, int]:
    """Cheap check from the header only (no decode): returns (width, height) or raises
    BadImageError for an empty file, a non-image, a refused mode or a too-small image."""
    if _file_size(path) == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            problem = mode_problem(im, convert) or _size_problem(*im.size, min_size)
            size = im.size
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not an image (unidentified format)") from e
    except (OSError, SyntaxError, ValueError) as e:  # header present but broken
        raise BadImageError(path, f"corrupt image header ({e})") from e
    if problem:
        raise BadImageError(path, problem)
    return size


def _file_size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: image file not found") from e


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(im, dtype=np.int64)  # 'I' or 'I;16*': values in 0..65535
        gray = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def load_rgb(path: str | Path, min_size: int = 0, convert: bool = False) -> np.ndarray:
    """Decodes ``path`` in full to uint8 [H, W, 3] or raises BadImageError (see module policy)."""
    probe_image(path, min_size, convert)
    try:
        with _no_truncated_loads(), Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"too large to decode safely ({e})") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, EOFError ...
        what = "truncated" if "truncated" in str(e) else "corrupt"
        raise BadImageError(path, f"{what} image data ({type(e).__name__}: {e})") from e
