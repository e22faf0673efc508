"""PASCAL VOC annotations and splits (VOC2007 and VOC2012 layouts; no torch).

A VOC root is the folder holding ``JPEGImages/``, ``Annotations/``, ``ImageSets/`` and, for the
images that have them, ``SegmentationClass/`` and ``SegmentationObject/`` PNGs (e.g.
``VOCdevkit/VOC2007`` or MiniVOC's ``data/minivoc/VOC2007``). Boxes are kept as VOC writes them:
1-based, inclusive pixel coordinates.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.cli import UserError

# The devkit's order: mmdet label = position, SegmentationClass value = position + 1.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


class VOCFormatError(UserError):
    """A VOC file that exists but cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Object:
    name: str
    bbox: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax: 1-based, inclusive
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class Annotation:
    width: int
    height: int
    objects: list[Object] = field(default_factory=list)


def read_split(voc_root: str | Path, split: str, task: str = "Main") -> list[str]:
    """Image ids of ``ImageSets/<task>/<split>.txt`` (first column), in file order."""
    path = Path(voc_root) / "ImageSets" / task / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found (split={split!r}, task={task!r})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCFormatError(f"{path}: split file is empty")
    return ids


def class_names(voc_root: str | Path) -> tuple[str, ...]:
    """The dataset's classes, in label order (detection label = position, SegmentationClass PNG
    value = position + 1 for a dataset with names VOC does not know, see transfer/README.md).

    ``<root>/classes.txt`` (one name per line) when present; else the classes that have
    ``ImageSets/Main/<cls>_train.txt`` or ``_trainval.txt`` files, in VOC's canonical order (real
    VOC: the 20 classes), names VOC does not know following, sorted."""
    listed = Path(voc_root) / "classes.txt"
    if listed.is_file():
        names = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
        dupes = sorted({n for n in names if names.count(n) > 1})
        if not names or dupes:
            raise VOCFormatError(
                f"{listed}: " + (f"repeated classes {dupes}" if dupes else "empty")
            )
        return names
    main = Path(voc_root) / "ImageSets" / "Main"
    found = {
        p.name.rsplit("_", 1)[0]
        for pattern in ("*_train.txt", "*_trainval.txt")
        for p in main.glob(pattern)
    }
    if not found:
        raise FileNotFoundError(f"{main}: no per-class <cls>_train.txt / <cls>_trainval.txt files")
    return tuple(c for c in VOC_CLASSES if c in found) + tuple(sorted(found - set(VOC_CLASSES)))


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise VOCFormatError(f"{path}: <{node.tag}> lacks <{tag}>")
    return child.text.strip()


def _int(node: ET.Element, tag: str, path: Path) -> int:
    text = _text(node, tag, path)
    try:
        return int(float(text))  # some VOC2012 boxes are written as floats ("273.0")
    except ValueError as e:
        raise VOCFormatError(f"{path}: <{tag}> is not a number: {text!r}") from e


def _flag(node: ET.Element, tag: str) -> bool:
    child = node.find(tag)
    return child is not None and child.text is not None and child.text.strip() not in ("", "0")


def _read_xml(path: Path) -> ET.Element:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise VOCFormatError(f"{path}: malformed XML ({e})") from e


def object_names(xml_path: str | Path) -> list[str]:
    """The ``<object><name>`` of one VOC XML, in file order (VOCFormatError if malformed)."""
    path = Path(xml_path)
    return [_text(node, "name", path) for node in _read_xml(path).findall("object")]


def parse_annotation(xml_path: str | Path, class_names: tuple[str, ...] | list[str]) -> Annotation:
    """Reads one VOC XML; every object must be of a known class with a box inside the image."""
    path = Path(xml_path)
    root = _read_xml(path)
    size = root.find("size")
    if size is None:
        raise VOCFormatError(f"{path}: no <size> element")
    width, height = _int(size, "width", path), _int(size, "height", path)
    if width <= 0 or height <= 0:
        raise VOCFormatError(f"{path}: image size {width}x{height} is not positive")
    objects = []
    for node in root.findall("object"):
        name = _text(node, "name", path)
        if name not in class_names:
            raise VOCFormatError(
                f"{path}: unknown class {name!r} (known: {', '.join(class_names)})"
            )
        box = node.find("bndbox")
        if box is None:
            raise VOCFormatError(f"{path}: object {name!r} has no <bndbox>")
        bbox = tuple(_int(box, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        xmin, ymin, xmax, ymax = bbox
        if xmax < xmin or ymax < ymin:
            raise VOCFormatError(f"{path}: degenerate box {bbox} for {name!r}")
        if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
            raise VOCFormatError(
                f"{path}: box {bbox} for {name!r} lies outside the {width}x{height} image"
            )
        objects.append(Object(name, bbox, _flag(node, "difficult"), _flag(node, "truncated")))  # type: ignore[arg-type]
    return Annotation(width, height, objects)


def object_shapes(
    voc_root: str | Path,
    ids: list[str] | None = None,
    max_shapes: int | None = None,
    min_pixels: int = 16,
) -> list[np.ndarray]:
    """Object silhouettes from ``SegmentationObject`` PNGs: bool [h, w] masks cropped to each
    instance's box (label values other than 0 = background and 255 = void), for random-region holes.

    ``ids``: default ``ImageSets/Segmentation/trainval.txt``, else every PNG present. Instances
    with fewer than ``min_pixels`` pixels are left out. A PNG whose size differs from its JPEG's
    is an error.
    """
    root = Path(voc_root)
    seg_dir = root / "SegmentationObject"
    if ids is None:
        split = root / "ImageSets" / "Segmentation" / "trainval.txt"
        if split.is_file():
            ids = read_split(root, "trainval", "Segmentation")
        else:
            ids = sorted(p.stem for p in seg_dir.glob("*.png"))
    shapes: list[np.ndarray] = []
    for image_id in ids:
        png = seg_dir / f"{image_id}.png"
        if not png.is_file():
            raise FileNotFoundError(f"{png}: segmentation PNG not found")
        try:
            with Image.open(png) as im:
                labels = np.asarray(im if im.mode in ("P", "L") else im.convert("P"))
        except OSError as e:
            raise VOCFormatError(f"{png}: unreadable segmentation PNG ({e})") from e
        jpg = root / "JPEGImages" / f"{image_id}.jpg"
        if jpg.is_file():
            with Image.open(jpg) as im:
                if im.size != (labels.shape[1], labels.shape[0]):
                    raise VOCFormatError(
                        f"{png}: size {labels.shape[1]}x{labels.shape[0]} differs from "
                        f"its image {jpg.name} ({im.size[0]}x{im.size[1]})"
                    )
        for value in np.unique(labels):
            if value in (0, 255):
                continue
            mask = labels == value
            if mask.sum() < min_pixels:
                continue
            ys, xs = np.nonzero(mask)
            shapes.append(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy())
            if max_shapes is not None and len(shapes) >= max_shapes:
                return shapes
    if not shapes:
        raise VOCFormatError(f"{seg_dir}: no object shapes found in {len(ids)} PNGs")
    return shapes
