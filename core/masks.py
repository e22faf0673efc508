"""Region masks of §3.3 (Fig. 3): central square, random blocks, random region.

Every generator is a pure function of its arguments and a ``numpy.random.Generator``; it returns a
bool array ``hole: [S, S]`` (True = pixel removed). Masks are drawn in the data pipeline
(:mod:`core.data`), never inside the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

MASK_KINDS = ("random_region", "random_block", "central", "none")


def central_square(size: int) -> tuple[int, int]:
    """(start, stop) of the central S/2 x S/2 square that the central model predicts (§4)."""
    return size // 4, size // 4 + size // 2


def central_mask(size: int, overlap: int = 4) -> np.ndarray:
    """Central hole: the S/2 square shrunk by ``overlap`` px on each side (§4: the network
    predicts the whole S/2 square, i.e. also a band of ``overlap`` px of known context)."""
    lo, hi = central_square(size)
    if 2 * overlap >= hi - lo:
        raise ValueError(f"overlap {overlap} too large for a {size}-px central square")
    hole = np.zeros((size, size), dtype=bool)
    hole[lo + overlap : hi - overlap, lo + overlap : hi - overlap] = True
    return hole


def random_block_mask(
    size: int, rng: np.random.Generator, max_coverage: float = 0.25, max_blocks: int = 8
) -> np.ndarray:
    """Several possibly overlapping rectangles covering up to ``max_coverage`` of the image.

    A target coverage is drawn in [max_coverage/2, max_coverage]; blocks (sides in [S/10, S/3]) are
    added while they keep the union at or below ``max_coverage``.
    """
    hole = np.zeros((size, size), dtype=bool)
    target = rng.uniform(max_coverage / 2, max_coverage)
    lo_side, hi_side = max(2, size // 10), max(3, size // 3)
    for _ in range(4 * max_blocks):
        if hole.mean() >= target:
            break
        h, w = rng.integers(lo_side, hi_side + 1, size=2)
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        trial = hole.copy()
        trial[y : y + h, x : x + w] = True
        if trial.mean() <= max_coverage:
            hole = trial
    return hole


def builtin_shapes(n: int = 64, seed: int = 0, res: int = 48) -> list[np.ndarray]:
    """Object-like silhouettes for random-region masks when the data has no segmentation masks.

    Star-shaped blobs: a smooth random radius r(theta) (a few low Fourier modes), filled.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    cy = cx = res / 2
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx) / (res / 2)
    shapes = []
    for _ in range(n):
        radius = np.full_like(theta, 0.6)
        for k in range(1, 6):
            amp = rng.normal(0, 0.18 / k)
            radius += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        shape = dist <= np.clip(radius, 0.15, 0.98)
        shapes.append(_crop_to_content(shape))
    return shapes


def _crop_to_content(shape: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(shape)
    if len(ys) == 0:
        raise ValueError("empty shape")
    return shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def shrink_shape(shape: np.ndarray, max_side: int = 48) -> np.ndarray:
    """Downscale a silhouette to at most ``max_side`` px: it is rescaled when pasted anyway, and
    small sources make each mask ~30x cheaper to draw (VOC objects can be 500 px)."""
    h, w = shape.shape
    if max(h, w) <= max_side:
        return shape
    k = max_side / max(h, w)
    img = Image.fromarray(shape.astype(np.uint8) * 255)
    img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
    return np.asarray(img) >= 128


def _deform(shape: np.ndarray, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Rotate (+-45 deg), maybe flip, and stretch ``shape`` into a ``height`` x ``width`` box.

    An inverse affine warp with nearest-neighbour sampling in numpy: ~50x cheaper than PIL's
    rotate + resize for these small boxes, so masks never slow the data pipeline down.
    """
    sh, sw = shape.shape
    theta = rng.uniform(-np.pi / 4, np.pi / 4)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    ys = (np.arange(height) + 0.5) / height - 0.5  # output box in [-0.5, 0.5]
    xs = ((np.arange(width) + 0.5) / width - 0.5) * flip
    cos, sin = np.cos(theta), np.sin(theta)
    # Rotated source coordinates, scaled so the rotated shape fits the box (factor 1/(|cos|+|sin|)).
    k = abs(cos) + abs(sin)
    src_y = (ys[:, None] * cos - xs[None, :] * sin) * k
    src_x = (ys[:, None] * sin + xs[None, :] * cos) * k
    iy = np.floor((src_y + 0.5) * sh).astype(np.int64)
    ix = np.floor((src_x + 0.5) * sw).astype(np.int64)
    inside = (iy >= 0) & (iy < sh) & (ix >= 0) & (ix < sw)
    out = np.zeros((height, width), dtype=bool)
    out[inside] = shape[iy[inside], ix[inside]]
    return out


def random_region_mask(
    size: int,
    rng: np.random.Generator,
    shapes: Sequence[np.ndarray],
    max_coverage: float = 0.25,
    max_shapes: int = 6,
) -> np.ndarray:
    """Object shapes (e.g. VOC ``SegmentationObject`` silhouettes) randomly scaled, rotated,
    stretched and pasted at random places, covering up to ``max_coverage`` of the image (§3.3).

    The shapes come from other images, so the hole is uncorrelated with the image it is applied to.
    """
    if not shapes:
        raise ValueError("random_region_mask needs at least one shape")
    # Coverage as count / size and clipping with min / max: the same floats as ndarray.mean and
    # np.clip (bit for bit), without their per-call overhead on these small arrays and scalars.
    hole = np.zeros((size, size), dtype=bool)
    n = hole.size
    target = rng.uniform(max_coverage / 2, max_coverage)
    for _ in range(4 * max_shapes):
        if np.count_nonzero(hole) / n >= target:
            break
        shape = shapes[int(rng.integers(len(shapes)))]
        side = rng.uniform(0.2, 0.6) * size
        aspect = np.exp(rng.uniform(-0.5, 0.5))
        h = int(min(max(side * aspect, 2), size))
        w = int(min(max(side / aspect, 2), size))
        piece = _deform(shape, rng, h, w)
        ph, pw = piece.shape
        y, x = rng.integers(0, size - ph + 1), rng.integers(0, size - pw + 1)
        trial = hole.copy()
        trial[y : y + ph, x : x + pw] |= piece
        if np.count_nonzero(trial) / n <= max_coverage:
            hole = trial
    return hole


@dataclass
class MaskGenerator:
    """Callable ``(rng) -> hole [S, S] bool`` for one mask strategy of :data:`MASK_KINDS`."""

    kind: str
    size: int
    overlap: int = 4
    max_coverage: float = 0.25
    shapes: Sequence[np.ndarray] = ()

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {MASK_KINDS}")
        if self.kind == "random_region":
            self.shapes = [shrink_shape(s) for s in (self.shapes or builtin_shapes())]
        if self.kind == "central":
            self._central = central_mask(self.size, self.overlap)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "central":
            return self._central.copy()
        if self.kind == "random_block":
            return random_block_mask(self.size, rng, self.max_coverage)
        if self.kind == "random_region":
            return random_region_mask(self.size, rng, self.shapes, self.max_coverage)
        return np.zeros((self.size, self.size), dtype=bool)
