"""Torch datasets of square uint8 images (item: [3, S, S]) from VOC splits and image folders.

Views: ``train=True`` takes a random resized crop (area 40-100 %, aspect 3/4-4/3) and a random
horizontal flip, drawn from torch's global RNG, so a seeded DataLoader (its generator seeds each
worker) or ``torch.manual_seed`` around ``ds[i]`` reproduces them; ``train=False`` resizes the short
side to S and takes the centre S x S crop. Images are decoded by ``core.images.load_rgb``
under the intake rule of ``core.images`` (other modes converted to RGB and counted, or refused
with ``strict=True``; EXIF orientation applied).

An image whose short side is below ``min_size`` (default S // 2: more than 2x upsampling) is bad.
The pre-scan at construction (``core.images.scan_files``) finds the bad files at once and raises
one ``BadImagesError`` listing them; with ``skip_bad=True`` they are left out and listed in
``dataset.skipped`` as (file, reason). A file that only fails when decoded (corrupt data inside)
is replaced by the next good index (deterministic, so the RNG stream is unchanged) and appended to
``skipped`` in the process that met it (a DataLoader worker's list is not seen by the main process;
the warning in the log is). ``dataset.intake(role)``: the counts a stage records in result.json.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from core import voc
from core.cli import UserError
from core.images import (
    BadImageError,
    BadImagesError,
    list_images,
    load_rgb,
    named,
    scan_files,
)

log = logging.getLogger(__name__)

CROP_SCALE = (0.4, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


# torchvision's transforms.v2 on the PIL image; its draws come from torch's global RNG, so (seed,
# step, slot) decides every crop of the pretext data pipeline (docs/decisions.md, "The train view").
@functools.cache
def _train_transform(size: int) -> v2.Compose:
    crop = v2.RandomResizedCrop(size, CROP_SCALE, CROP_RATIO, v2.InterpolationMode.BILINEAR)
    return v2.Compose([crop, v2.RandomHorizontalFlip()])


def train_view(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> random resized crop + random flip, uint8 [size, size, 3]."""
    return np.asarray(_train_transform(size)(Image.fromarray(image)))


# Hand-written, not Resize + CenterCrop (which round the crop elsewhere): eval/query.py maps boxes
# into this geometry (docs/decisions.md, "The eval view stays hand-written").
def eval_view(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> short side resized to ``size``, centre crop, uint8 [size, size, 3]."""
    h, w = image.shape[:2]
    k = size / min(h, w)
    nw, nh = max(size, round(w * k)), max(size, round(h * k))
    im = Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im)[top : top + size, left : left + size]


def _reason(e: Exception) -> str:
    return e.problem if isinstance(e, BadImageError) else "file not found"


class ImageFiles(Dataset):
    """A list of image files -> uint8 [3, S, S] views; the shared core of the datasets below."""

    def __init__(
        self,
        files: Sequence[str | Path],
        image_size: int,
        train: bool,
        skip_bad: bool = False,
        strict: bool = False,
        min_size: int | None = None,
        scan: bool = True,
        where: str | Path = "",
    ):
        self.image_size, self.train = image_size, train
        self.skip_bad, self.strict = skip_bad, strict
        self.min_size = image_size // 2 if min_size is None else min_size
        self.failed: set[int] = set()  # indices whose decode failed (in this process)
        self.n_listed = len(files)
        self.not_images: list[str] = getattr(self, "not_images", [])  # set by folder listings
        where = where or (Path(files[0]).parent if files else "")
        found = scan_files(files, self.min_size, strict) if scan else None
        self.keep = found.keep if found else list(range(len(files)))  # positions that passed
        self.skipped: list[tuple[str, str]] = list(found.bad) if found else []
        self.converted = dict(found.converted) if found else {}
        if self.skipped and not skip_bad:
            raise BadImagesError(where, self.skipped, len(files))
        self.files = [str(files[k]) for k in self.keep]
        if self.skipped:
            log.warning(
                "%s: skipped %d of %d images as bad (images.skip_bad): %s",
                where, len(self.skipped), len(files),
                "; ".join(f"{Path(f).name}: {why}" for f, why in self.skipped[:5])
                + (f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""),
            )  # fmt: skip
        if self.converted:
            log.info(
                "%s: converted %d of %d images to RGB (%s)", where, sum(self.converted.values()),
                len(self.files), ", ".join(f"{m} {n}" for m, n in sorted(self.converted.items())),
            )  # fmt: skip
        if not self.files:
            raise (
                BadImagesError(where, self.skipped, len(files))
                if self.skipped
                else UserError(f"{where}: no image files to read")
            )

    def intake(self, role: str) -> dict[str, float]:
        """What the intake did, for result.json: ``images/<role>/{files,used,skipped_bad,
        not_images,converted}`` and ``images/<role>/converted/<mode>`` per source mode."""
        p = f"images/{role}/"
        out = {
            p + "files": float(self.n_listed),
            p + "used": float(len(self.files)),
            p + "skipped_bad": float(len(self.skipped)),
            p + "not_images": float(len(self.not_images)),
            p + "converted": float(sum(self.converted.values())),
        }
        out.update({f"{p}converted/{m}": float(n) for m, n in sorted(self.converted.items())})
        return out

    def __len__(self) -> int:
        return len(self.files)

    def view(self, image: np.ndarray) -> torch.Tensor:
        out = (
            train_view(image, self.image_size) if self.train else eval_view(image, self.image_size)
        )
        return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()  # a writable copy

    def load(self, index: int) -> tuple[int, np.ndarray]:
        """(index actually used, uint8 [H, W, 3]); with skip_bad a file that fails to decode is
        replaced by the next one that does."""
        for step in range(len(self.files)):
            i = (index + step) % len(self.files)
            if i in self.failed:
                continue
            try:
                return i, load_rgb(self.files[i], self.min_size, self.strict)
            except (BadImageError, FileNotFoundError) as e:
                if not self.skip_bad:
                    raise
                self.failed.add(i)  # counted once, not retried
                self.skipped.append((self.files[i], _reason(e)))
                log.warning("skipping bad image %s", e)
        raise RuntimeError(f"none of the {len(self.files)} images decodes")

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.view(self.load(index)[1])


class VOCImages(ImageFiles):
    """``JPEGImages/<id>.jpg`` for the ids of ``ImageSets/Main/<split>.txt``."""

    def __init__(
        self,
        voc_root: str | Path,
        split: str,
        image_size: int,
        train: bool,
        skip_bad: bool = False,
        strict: bool = False,
        min_size: int | None = None,
    ):
        self.voc_root = Path(voc_root)
        ids = voc.read_split(self.voc_root, split)
        files = [self.voc_root / "JPEGImages" / f"{i}.jpg" for i in ids]
        where = self.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        super().__init__(files, image_size, train, skip_bad, strict, min_size, where=where)
        self.ids = [ids[k] for k in self.keep]


def image_folder(root: str | Path) -> Path:
    """``root`` as the folder of an image-folder dataset; FileNotFoundError when it is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return root


class ImageFolderImages(ImageFiles):
    """Every image under ``root``, recursively, sorted by path (ImageNet ``train/<wnid>/*.JPEG``,
    Paris StreetView's flat folders): the files with an extension Pillow opens
    (``core.images.IMAGE_EXTENSIONS``, any case); the others are left out, counted and named in
    the log (``not_images``).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        train: bool,
        skip_bad: bool = False,
        strict: bool = False,
        min_size: int | None = None,
    ):
        self.root = image_folder(root)
        files, others = list_images(self.root)
        self.not_images = [str(p) for p in others]
        if others:
            log.info(
                "%s: left out %d files that are no image by their extension: %s",
                self.root, len(others), named(others),
            )  # fmt: skip
        if not files:
            raise FileNotFoundError(
                f"{self.root}: no image files (extensions Pillow opens, e.g. .jpg .png .gif .pgm)"
                + (f"; found only {named(others)}" if others else "")
            )
        super().__init__(files, image_size, train, skip_bad, strict, min_size, where=self.root)
        # ids: paths relative to root ("n01440764/x.JPEG" in class subfolders, "x.jpg" when flat)
        self.ids = [Path(f).relative_to(self.root).as_posix() for f in self.files]


class VOCClassification(VOCImages):
    """VOC multi-label classification. Item: (uint8 [3, S, S], labels float [C], difficult_only
    float [C]): labels[c] = 1 when class c has a non-difficult object, difficult_only[c] = 1 when
    it appears only as difficult objects (the VOC07 protocol ignores those entries): the one VOC
    label convention of the suite (core.classifier.multilabel_bce)."""

    multi_label = True

    def __init__(
        self,
        voc_root: str | Path,
        split: str,
        image_size: int,
        train: bool,
        class_names: Sequence[str] | None = None,
        skip_bad: bool = False,
        strict: bool = False,
        min_size: int | None = None,
    ):
        found = voc.class_names(voc_root)
        if class_names is not None and tuple(class_names) != found:
            raise ValueError(
                f"{voc_root}: class_names {tuple(class_names)} do not match the dataset's {found}"
            )
        super().__init__(voc_root, split, image_size, train, skip_bad, strict, min_size)
        self.class_names = found
        n = len(self.ids)
        self.labels = torch.zeros(n, len(found))
        self.difficult_only = torch.zeros(n, len(found))
        for row, image_id in enumerate(self.ids):
            ann = voc.parse_annotation(self.voc_root / "Annotations" / f"{image_id}.xml", found)
            for c, name in enumerate(found):
                flags = [o.difficult for o in ann.objects if o.name == name]
                self.labels[row, c] = float(bool(flags) and not all(flags))
                self.difficult_only[row, c] = float(bool(flags) and all(flags))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        i, image = self.load(index)
        return self.view(image), self.labels[i], self.difficult_only[i]


class LabelError(UserError):
    """A labelled data set that cannot give labels (a flat folder, an unknown class)."""


def no_class_subfolders(root: Path) -> LabelError:
    return LabelError(
        f"{root}: no class subfolders (method=supervised with data.format=folder "
        "reads <root>/<class>/<image>, e.g. ImageNet train/<wnid>/*.JPEG)"
    )


class ImageFolderClasses(ImageFolderImages):
    """``<root>/<class>/**/<image>``. Item: (uint8 [3, S, S], int64 class index).

    ``class_names``: default the sorted names of the class subfolders; given (the train set's, for
    a val folder), a subfolder not among them is an error.
    """

    multi_label = False

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        train: bool,
        skip_bad: bool = False,
        class_names: tuple[str, ...] | None = None,
        strict: bool = False,
    ):
        super().__init__(root, image_size, train, skip_bad, strict)
        rel = [Path(f).relative_to(self.root) for f in self.files]
        flat = [r for r in rel if len(r.parts) == 1]
        if len(flat) == len(rel):
            raise no_class_subfolders(self.root)
        if flat:
            raise LabelError(
                f"{self.root}: {flat[0]} is not in a class subfolder ({len(flat)} such images); "
                "method=supervised reads <root>/<class>/<image>"
            )
        found = tuple(sorted({r.parts[0] for r in rel}))
        self.class_names = found if class_names is None else tuple(class_names)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise LabelError(
                f"{self.root}: class subfolder(s) {unknown[:5]} are not among the "
                f"{len(self.class_names)} training classes"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = torch.tensor([index[r.parts[0]] for r in rel], dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        i, image = self.load(index)
        return self.view(image), self.labels[i]
