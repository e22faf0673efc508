"""Checks on a VOC root before a transfer run, so a bad dataset fails early with a clear message.

A VOC root holds ``JPEGImages/``, ``Annotations/``, ``ImageSets/{Main,Segmentation}/`` (real VOC:
``VOCdevkit/VOC2007`` or ``VOCdevkit/VOC2012``; built-in: ``data/minivoc/VOC2007``, generated on
first use).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core import voc
from core.data import ensure_builtin
from core.run_folder import TransferError


def voc_root(path: str | Path) -> Path:
    """``path`` as a VOC root; the built-in mini-VOC is generated when its default root is missing."""
    root = Path(path)
    ensure_builtin(root)
    if not root.is_dir():
        raise TransferError(f"{root}: VOC root not found (give --data <VOCdevkit/VOC2007>)")
    if (root / "VOC2007").is_dir() or (root / "VOC2012").is_dir():
        raise TransferError(
            f"{root}: this is a VOCdevkit folder; give the year folder, e.g. {root / 'VOC2007'}"
        )
    return root


def require_split(root: Path, split: str, task: str = "Main") -> list[str]:
    """Image ids of ``ImageSets/<task>/<split>.txt``; TransferError naming the file if missing."""
    try:
        return voc.read_split(root, split, task)
    except (FileNotFoundError, voc.VOCFormatError) as err:
        present = sorted(
            p.stem for p in (root / "ImageSets" / task).glob("*.txt") if "_" not in p.stem
        )
        raise TransferError(f"{err}; splits present: {present or 'none'}") from None


def dataset_classes(root: Path, expected: Sequence[str] = ()) -> tuple[str, ...]:
    """The dataset's classes (VOC order); TransferError if ``expected`` is given and differs."""
    try:
        found = voc.class_names(root)
    except FileNotFoundError as err:
        raise TransferError(str(err)) from None
    if expected and tuple(expected) != found:
        raise TransferError(
            f"{root}: classes {list(expected)} were asked for, but the dataset has {list(found)} "
            f"(from ImageSets/Main/<cls>_*.txt); set classes=[] to use the dataset's"
        )
    return found
