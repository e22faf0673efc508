"""Where a split of a data root is, and :func:`open_split`, the one way a stage opens a dataset.

    images = open_split("data/minivoc/VOC2007", "test", 64, train=False)          # eval views
    voc = open_split(root, "trainval", 64, train=True, labels=True)               # + VOC labels
    photos = open_split("photos", "train", 64, True, labels=True, fmt="folder")   # + class index

Formats (``fmt``):

- ``auto`` (the eval stages): :func:`split_source` decides: a VOC root with
  ``ImageSets/Main/<split>.txt``; a folder ``<root>/<split>/`` (``split`` empty or ``.``: all of
  ``root``; an absolute ``split``: that folder), every image under it, flat or in class subfolders,
  sorted; or a split file ``<root>/<split>`` (or an absolute path), one image per line, a path
  relative to ``root`` (or a VOC id when ``root`` has ``JPEGImages/``);
- ``voc``: a VOC root; ``folder``: ``<root>/<split>`` when it is a folder, else ``<root>`` itself
  (the pretext ``data.format`` values).

``labels=True``: a VOC split's items carry (labels, difficult_only) (``VOCClassification``), an
image folder's the index of its class subfolder (``ImageFolderClasses``; ``class_names``: the
train set's, for a val folder). Every dataset is read under the intake rule ``rule`` (the
``images`` section: strict, skip_bad; core.images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from core.cli import UserError
from core.data import ensure_builtin
from core.datasets import (
    ImageFiles,
    ImageFolderClasses,
    ImageFolderImages,
    VOCClassification,
    VOCImages,
)
from core.images import ImagesConfig

Format = Literal["auto", "voc", "folder"]


class SplitError(UserError):
    """A split of a data folder that cannot be read (a binary file, a line naming no file)."""


def is_voc_root(data: str | Path) -> bool:
    return (Path(data) / "JPEGImages").is_dir() and (Path(data) / "ImageSets" / "Main").is_dir()


def split_folder(root: str | Path, split: str) -> Path:
    """``fmt=folder``: ``<root>/<split>`` when it is a folder, else ``<root>`` itself."""
    root = Path(root)
    return root / split if (root / split).is_dir() else root


def split_source(data: str | Path, split: str) -> tuple[str, Path]:
    """Where ``fmt=auto`` finds ``split`` of ``data``, without reading it: ("voc", root),
    ("folder", folder) or ("file", split file); FileNotFoundError naming what is missing."""
    root = Path(data)
    if root.is_file():
        raise SplitError(f"{root}: data is a file; give a folder of images or a VOC root")
    if is_voc_root(root) and (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return "voc", root
    target = (
        root if split in ("", ".") else Path(split) if Path(split).is_absolute() else root / split
    )
    if target.is_dir():
        return "folder", target
    if target.is_file():
        return "file", target
    if not root.is_dir() and not Path(split).is_absolute():
        raise FileNotFoundError(f"{root}: data folder not found")
    raise FileNotFoundError(
        f"{target}: split {split!r} of {root} not found: expected a folder of images, a split file "
        f"(one image path per line) or a VOC root with ImageSets/Main/{split}.txt"
    )


def folder_class_labels(ids: list[str]) -> list[str] | None:
    """Class of each image of a class-subfolder dataset (the first path component of its id), or
    None when the images are not all in subfolders (a flat folder, a VOC split)."""
    if not ids or not all("/" in i for i in ids):
        return None
    return [i.split("/", 1)[0] for i in ids]


def open_split(
    root: str | Path,
    split: str,
    size: int,
    train: bool,
    labels: bool = False,
    fmt: Format = "auto",
    class_names: Sequence[str] | None = None,
    rule: ImagesConfig | None = None,
) -> ImageFiles:
    """The dataset of ``split`` of ``root`` (uint8 [3, S, S] items, ``.ids``, ``.files``): the train
    view (random resized crop + flip) or the eval view (centre crop); see the module docstring."""
    root, rule = Path(root), rule or ImagesConfig()
    ensure_builtin(root)  # the built-in mini-VOC is generated on first use
    kind, target = ("voc", root) if fmt == "voc" else ("folder", split_folder(root, split))
    if fmt == "auto":
        kind, target = split_source(root, split)
    if kind == "voc":
        if labels:
            return VOCClassification(
                root, split, size, train, class_names, rule.skip_bad, rule.strict
            )
        return VOCImages(root, split, size, train, rule.skip_bad, rule.strict)
    if kind == "folder":
        if labels:
            names = None if class_names is None else tuple(class_names)
            return ImageFolderClasses(target, size, train, rule.skip_bad, names, rule.strict)
        return ImageFolderImages(target, size, train, rule.skip_bad, rule.strict)
    if labels:
        raise SplitError(f"{target}: a split file has no labels; give a VOC root or class folders")
    return split_file_images(root, target, split, size, train, rule)


def split_file_images(
    root: Path, target: Path, split: str, size: int, train: bool, rule: ImagesConfig
) -> ImageFiles:
    """The images a split file lists (ids: its lines); a line naming a missing file is an error
    naming the split file and the line."""
    try:
        text = target.read_text()
    except UnicodeDecodeError:
        raise SplitError(
            f"{target}: not a text split file (split={split!r}: give a subfolder of {root}, "
            "a split file with one image path per line, or '.' for all of it)"
        ) from None
    numbered = [(k, ln.strip()) for k, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not numbered:
        raise FileNotFoundError(f"{target}: split file lists no images")
    jpegs = root / "JPEGImages"
    files = [
        Path(ln) if Path(ln).is_absolute()
        else jpegs / f"{ln}.jpg" if not Path(ln).suffix and jpegs.is_dir()
        else root / ln
        for _, ln in numbered
    ]  # fmt: skip
    missing = [(k, f) for (k, _), f in zip(numbered, files) if not f.is_file()]
    if missing:
        (k, f), more = missing[0], len(missing) - 1
        raise SplitError(
            f"{target}: line {k} names {f}, which is not there"
            + (f" ({more} more lines name missing files)" if more else "")
        )
    images = ImageFiles(files, size, train, rule.skip_bad, rule.strict, where=target)
    images.ids = [numbered[k][1] for k in images.keep]
    return images
