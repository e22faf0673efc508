"""Checks on a VOC root before a transfer run, so a bad dataset fails early with a clear message.

A VOC root holds ``JPEGImages/``, ``Annotations/``, ``ImageSets/{Main,Segmentation}/`` (real VOC:
``VOCdevkit/VOC2007`` or ``VOCdevkit/VOC2012``; built-in: ``data/minivoc/VOC2007``, generated on
first use).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from core import voc
from core.data import ensure_builtin
from core.run_folder import TransferError

log = logging.getLogger(__name__)


def voc_root(path: str | Path, key: str = "--data ") -> Path:
    """``path`` as a VOC root; the built-in mini-VOC is generated when its default root is missing.
    ``key``: how the stage's user names it, in the message of a missing root."""
    root = Path(path)
    ensure_builtin(root)
    if not root.is_dir():
        raise TransferError(f"{root}: VOC root not found (give {key}<VOCdevkit/VOC2007>)")
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


# what each entry of an ImageSets/<task> split needs besides its JPEG
ANNOTATION = {"Main": ("Annotations", ".xml"), "Segmentation": ("SegmentationClass", ".png")}
SHOWN = 5


def check_entries(root: Path, split: str, task: str = "Main") -> list[str]:
    """Image ids of ``split``; TransferError naming the split file and the line of the first
    entry whose JPEG or annotation (``Annotations/<id>.xml``, ``SegmentationClass/<id>.png``) is
    missing, with the count of such lines."""
    ids = require_split(root, split, task)
    folder, ext = ANNOTATION[task]
    path = root / "ImageSets" / task / f"{split}.txt"
    missing = []
    lines = [(k, t.split()[0]) for k, t in enumerate(path.read_text().splitlines(), 1) if t.strip()]
    for line, image_id in lines:
        for need in (root / "JPEGImages" / f"{image_id}.jpg", root / folder / f"{image_id}{ext}"):
            if not need.is_file():
                missing.append((line, image_id, need))
                break
    if missing:
        line, image_id, need = missing[0]
        more = f" ({len(missing) - 1} more entries lack files)" if len(missing) > 1 else ""
        raise TransferError(f"{path}: line {line} ({image_id}): {need} not found{more}")
    return ids


def unknown_objects(root: Path, ids: Sequence[str], classes: Sequence[str]) -> dict[str, list[str]]:
    """{xml file: [object names not in ``classes``]} over the annotations of ``ids``."""
    known, found = set(classes), {}
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        names = [n for n in voc.object_names(xml) if n not in known]
        if names:
            found[str(xml)] = names
    return found


def check_objects(
    root: Path, ids: Sequence[str], classes: Sequence[str], skip_unknown: bool
) -> int:
    """The number of objects whose class is not in ``classes`` (left out by the detector's
    dataset); TransferError listing the files and names unless ``skip_unknown``."""
    found = unknown_objects(root, ids, classes)
    n = sum(len(v) for v in found.values())
    if found and not skip_unknown:
        shown = "; ".join(
            f"{Path(f).name} ({', '.join(sorted(set(v)))})" for f, v in list(found.items())[:SHOWN]
        )
        more = f"; and {len(found) - SHOWN} more files" if len(found) > SHOWN else ""
        names = sorted({x for v in found.values() for x in v})
        raise TransferError(
            f"{root / 'Annotations'}: {n} objects in {len(found)} files have classes not in the "
            f"class list ({', '.join(names)}): {shown}{more}; add them to {root / 'classes.txt'} "
            "(transfer/README.md), or set unknown_classes=skip to leave them out (counted)"
        )
    if found:
        log.warning("%s: left out %d objects of unknown classes (%s)", root, n,
                    ", ".join(sorted({x for v in found.values() for x in v})))  # fmt: skip
    return n
