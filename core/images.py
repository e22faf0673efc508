"""The intake rule of every stage: how an image file becomes uint8 RGB, or why it cannot.

Every image any stage reads (pretext, transfer's classification, the eval tools) goes through
:func:`load_rgb`, and every image folder / split through one pre-scan (:func:`scan_files`, used by
``core.datasets.ImageFiles``). The rule, with the config section every stage has (``images.*``,
:class:`ImagesConfig`; docs/images.md):

- Modes (default): any mode Pillow decodes is converted to 8-bit RGB, as torchvision's
  ``ImageFolder`` loader does (``Image.convert('RGB')``): grayscale (L, 1) replicated to 3
  channels, alpha (LA, RGBA, PA, P with transparency) dropped, palette looked up, CMYK through
  PIL's conversion (no ICC profile); 16-bit (I;16*, I, 48-bit RGB PNGs) scaled to 8 bits
  (v * 255 / 65535, rounded; 48-bit PNGs keep the high byte, which is what PIL decodes). Float
  images (F) are refused. Each conversion is counted per source mode (logged, recorded in the
  stage's result.json as ``images/<role>/converted/<mode>``).
- ``images.strict=true``: only 8-bit RGB (and palette images without transparency, whose RGB
  conversion loses nothing) is accepted; any other mode is a bad file.
- EXIF orientation is applied (``ImageOps.exif_transpose``): a photo is seen upright.
- Formats: the file's bytes decide, not its extension (a PNG named ``.jpg`` loads as PNG). A folder
  is listed by the extensions Pillow registers for the formats it opens
  (:data:`IMAGE_EXTENSIONS`); other files are left out, counted and named in the log.
- Bad files: empty, not an image, truncated (no end marker: decoded in full to confirm, never
  padded -- ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off), a refused mode, short side below
  ``min_size``. The pre-scan finds them all at once and raises one :class:`BadImagesError`
  listing the first few by name and the count; ``images.skip_bad=true`` leaves them out (counted,
  named in the log, recorded as ``images/<role>/skipped_bad``). Corrupt data inside a file that
  has its end marker is only found when decoded (then skipped in place under skip_bad).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.cli import UserError

log = logging.getLogger(__name__)

Image.init()  # every plugin registered, so the extension list is complete
# the extensions of the formats Pillow opens (PDF, MPO's save-only entries ... are not among them)
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(
    sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
SHOWN = 5  # bad files named in one error message; the rest are counted


@dataclass
class ImagesConfig:
    """The ``images`` section of every stage that reads images (docs/images.md)."""

    strict: bool = False  # refuse non-RGB images (and name them) instead of converting them
    skip_bad: bool = False  # leave bad files out (counted, named in the log, in result.json)


class BadImageError(UserError):
    """An image file that cannot be used; the message is '<path>: <problem>'."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


class BadImagesError(UserError):
    """Bad files found by one pre-scan: the first few named, then the count, then the way out."""

    def __init__(self, where: str | Path, bad: Sequence[tuple[str, str]], n_files: int):
        self.bad = list(bad)
        hint = "fix or remove them, or set images.skip_bad=true to leave them out (counted)"
        if any("images.strict" in p for _, p in bad):
            hint += "; images.strict=false converts other modes to RGB"
        if len(bad) == 1:
            path, problem = bad[0]
            super().__init__(f"{path}: {problem}; {hint}")
            return
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        super().__init__(
            f"{where}: {len(bad)} of {n_files} image files are bad: {shown}{more}; {hint}"
        )


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


def source_mode(im: Image.Image) -> str:
    """What ``im`` is converted from: its mode ('RGB' when nothing is converted), the raw 16-bit
    mode of a 48-bit PNG, 'P+alpha' for a palette image with transparency."""
    wide = _sixteen_bit_mode(im)
    if wide:
        return wide
    if im.mode == "P":
        return "P+alpha" if "transparency" in im.info else "RGB"  # a lossless palette: no change
    return im.mode


def mode_problem(im: Image.Image, strict: bool = False) -> str | None:
    """Why ``im`` (opened, maybe not decoded) is refused under the rule above; None if usable."""
    mode = im.mode
    if mode == "F" or mode.startswith("F;"):
        return f"floating-point image (mode {mode}) not supported"
    src = source_mode(im)
    if src == "RGB" or not strict:
        return None
    kind = (
        "16-bit" if src.endswith(("16", "16B", "16L", "16N")) or src == "I"
        else "grayscale" if mode in ("L", "1", "LA", "La")
        else "RGBA/alpha" if mode in ("RGBA", "RGBa", "PA", "P")
        else mode if mode == "CMYK"
        else "non-RGB"
    )  # fmt: skip
    return f"{kind} image (mode {src}) refused by images.strict=true"


def _size_problem(width: int, height: int, min_size: int) -> str | None:
    if min(width, height) < min_size:
        return f"too small: {width}x{height}, short side < min_size {min_size}"
    return None


def _file_size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: image file not found") from e


def probe_image(path: str | Path, min_size: int = 0, strict: bool = False) -> tuple[int, int]:
    """Cheap check from the header only (no decode): returns (width, height) or raises
    BadImageError for an empty file, a non-image, a refused mode or a too-small image."""
    return _probe(path, min_size, strict)[0]


def _probe(path: str | Path, min_size: int, strict: bool) -> tuple[tuple[int, int], str, str]:
    """((width, height), source mode, format) from the header; BadImageError as probe_image."""
    if Path(path).is_dir():
        raise BadImageError(path, "a folder, not an image file")
    if _file_size(path) == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            problem = mode_problem(im, strict) or _size_problem(*im.size, min_size)
            size, mode, fmt = im.size, source_mode(im), im.format or ""
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not an image (unidentified format)") from e
    except (OSError, SyntaxError, ValueError) as e:  # header present but broken
        raise BadImageError(path, f"corrupt image header ({e})") from e
    if problem:
        raise BadImageError(path, problem)
    return size, mode, fmt


def _lacks_end_marker(path: str | Path, fmt: str) -> bool:
    """A JPEG without its EOI marker or a PNG without IEND near the end: probably truncated."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
    if marker is None:
        return False
    with open(path, "rb") as fh:
        fh.seek(max(0, _file_size(path) - 64))
        return marker not in fh.read()


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(im, dtype=np.int64)  # 'I' or 'I;16*': values in 0..65535
        gray = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def load_rgb(path: str | Path, min_size: int = 0, strict: bool = False) -> np.ndarray:
    """Decodes ``path`` in full, upright (EXIF orientation), to uint8 [H, W, 3], or raises
    BadImageError (see the module's rule)."""
    probe_image(path, min_size, strict)
    try:
        with _no_truncated_loads(), Image.open(path) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"too large to decode safely ({e})") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, EOFError ...
        what = "truncated" if "truncated" in str(e) else "corrupt"
        raise BadImageError(path, f"{what} image data ({type(e).__name__}: {e})") from e


# ---- the pre-scan ------------------------------------------------------------------------------


@dataclass
class Scan:
    """What the pre-scan of a file list found: the usable files' positions, the bad ones
    (path, problem), the count of each source mode converted to RGB."""

    keep: list[int] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)


def scan_files(files: Sequence[str | Path], min_size: int, strict: bool) -> Scan:
    """One pass over ``files``: header checks, plus a full decode of any JPEG / PNG that lacks its
    end marker (a truncated file); every problem collected, nothing raised."""
    scan = Scan()
    for k, path in enumerate(files):
        try:
            _, mode, fmt = _probe(path, min_size, strict)
            if _lacks_end_marker(path, fmt):
                load_rgb(path, min_size, strict)  # raises if it really is truncated
        except BadImageError as e:
            scan.bad.append((str(path), e.problem))
            continue
        except FileNotFoundError:
            scan.bad.append((str(path), "file not found"))
            continue
        scan.keep.append(k)
        if mode != "RGB":
            scan.converted[mode] += 1
    return scan


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, sorted; image files by Pillow's
    extensions (case-insensitive), dot-files counted among the others."""
    images, others = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        ok = p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        (images if ok else others).append(p)
    return images, others


def named(paths: Iterable[str | Path], shown: int = SHOWN) -> str:
    """'a.txt, b.xml and 3 more' (file names)."""
    paths = [Path(p).name for p in paths]
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
