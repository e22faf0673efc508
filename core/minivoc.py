"""MiniVOC: a deterministic miniature PASCAL VOC2007, written in the real VOC on-disk format.

Our loaders, mmdet 3.3 ``VOCDataset`` and mmseg 1.2 ``PascalVOCDataset`` read it like real VOC::

    <out>/VOC2007/JPEGImages/<id>.jpg            RGB, sides in ``size_range``, PIL quality 90
    <out>/VOC2007/Annotations/<id>.xml           VOC XML, 1-based inclusive integer boxes
    <out>/VOC2007/SegmentationClass/<id>.png     'P' PNG, VOC colour map, value = VOC class index
    <out>/VOC2007/SegmentationObject/<id>.png    'P' PNG, value i = i-th <object> of the XML
    <out>/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt and <cls>_<split>.txt (" 1"/"-1"/" 0")
    <out>/VOC2007/ImageSets/Segmentation/{train,val,trainval}.txt  (a subset, as in real VOC)
    <out>/VOC2007/minivoc.json                   the parameters; written last (completeness stamp)

Classes are the first 8 of VOC's 20, in VOC's canonical order, so a class's position in
``VOC_CLASSES`` is both its mmdet label and (plus one) its SegmentationClass value:
aeroplane=1, bicycle=2, ..., cat=8; 0 = background, 255 = void (a 2-pixel band on every object
boundary, like real VOC). Each class is a procedural shape family (car: body, cabin, wheels; bottle:
body, neck, cap, label; ...) with class-typical colours, drawn 4x supersampled (smooth edges), shaded,
randomly scaled / stretched / rotated / flipped, 1-4 per image, occluding each other and truncated by
the image border. Backgrounds are crops of the photos and textures shipped with scikit-image and
scikit-learn (no download) or smooth gradients with low-frequency noise, so an inpainting model has
continuous structure to learn.

Same parameters and seed => byte-identical files (same Pillow / NumPy versions): image ``i`` is drawn
from its own generator seeded with (seed, i), JPEGs carry no metadata, PNGs no timestamps.
The tree is built in a hidden sibling folder and renamed into place, so ``VOC2007`` is either complete
or absent; ``generate`` returns at once when a complete tree for the same parameters exists.
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from core.cli import ArgumentParser
from core.voc import VOC_CLASSES

CLASSES: tuple[str, ...] = VOC_CLASSES[:8]
DEFAULT_N_IMAGES = 1000
FORMAT_VERSION = 1  # bump whenever the drawing changes: a stamp of another version is regenerated
STAMP = "minivoc.json"
VOID = 255
SUPERSAMPLE = 4
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Params:
    n_images: int = DEFAULT_N_IMAGES
    seed: int = 0
    size_range: tuple[int, int] = (96, 160)  # min / max image side in pixels, drawn independently
    seg_fraction: float = 0.5  # share of train and of val images that get segmentation PNGs
    version: int = FORMAT_VERSION


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (devkit ``VOClabelcolormap``), flattened [r, g, b, ...]."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


# ----------------------------------------------------------------------------------- backgrounds
@functools.lru_cache(maxsize=1)
def background_sources() -> tuple[np.ndarray, ...]:
    """Photos and textures bundled with scikit-image / scikit-learn, as uint8 [H, W, 3] or [H, W].

    chelsea/cat are left out: a real cat in the background would be an unlabelled 'cat'.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
    names += ["brick", "grass", "gravel", "camera", "moon", "coins", "clock"]
    sources = [np.asarray(getattr(skimage.data, name)()) for name in names]
    sources += list(load_sample_images().images)
    out = []
    for src in sources:  # at most 512 px a side: crops are then cheap and similar in scale
        im = Image.fromarray(src)
        if max(im.size) > 512:
            k = 512 / max(im.size)
            im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BILINEAR)
        out.append(np.asarray(im))
    return tuple(out)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], [h, w]: a random ``cells`` x ``cells`` grid, bicubic-upsampled."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)) / 255.0


def photo_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random crop of a bundled photo / texture (textures tinted), float [h, w, 3] in 0..255."""
    sources = background_sources()
    src = sources[rng.integers(len(sources))]
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.25, 1.0) * min(sh / h, sw / w)
    ch, cw = max(8, round(h * scale)), max(8, round(w * scale))
    y, x = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    crop = Image.fromarray(src[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BILINEAR)
    out = np.asarray(crop, dtype=np.float64)
    if out.ndim == 2:  # a grey texture gets a colour
        tint = rng.uniform(0.45, 1.15, 3)
        out = out[..., None] * tint / tint.max() + rng.uniform(0, 50, 3)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out * rng.uniform(0.75, 1.15) + rng.uniform(-20, 20)


def procedural_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A two-colour gradient (sometimes a horizon) plus low-frequency noise, float [h, w, 3]."""
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle) + 0.5
    if rng.random() < 0.4:  # sky over ground
        horizon = rng.uniform(0.3, 0.7) * h + smooth_noise(rng, 1, w, 4) * rng.uniform(0, 0.2) * h
        t = np.where(yy < horizon, t * 0.3, 0.7 + t * 0.3)
    t = np.clip(t, 0, 1)[..., None]
    out = c0 * (1 - t) + c1 * t
    noise = smooth_noise(rng, h, w, int(rng.integers(3, 12))) - 0.5
    return out + noise[..., None] * rng.uniform(20, 80, 3)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.random()
    if kind < 0.6:
        return photo_background(rng, h, w)
    if kind < 0.85:
        return procedural_background(rng, h, w)
    mix = rng.uniform(0.2, 0.5)
    return photo_background(rng, h, w) * (1 - mix) + procedural_background(rng, h, w) * mix


# ---------------------------------------------------------------------------------- shape families
Colour = tuple[int, int, int, int]


def jitter(rng: np.random.Generator, base: tuple[int, int, int], amount: float = 25) -> Colour:
    r, g, b = np.clip(np.asarray(base) + rng.normal(0, amount, 3), 0, 255).astype(int)
    return (int(r), int(g), int(b), 255)


def shade(c: Colour, k: float) -> Colour:
    return (*(int(min(255, v * k)) for v in c[:3]), 255)  # type: ignore[return-value]


def pick(rng: np.random.Generator, colours: list[tuple[int, int, int]]) -> Colour:
    return jitter(rng, colours[rng.integers(len(colours))])


def disc(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: Colour) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def wheel(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    disc(d, cx, cy, r, jitter(rng, (25, 25, 28), 8))
    disc(d, cx, cy, r * 0.45, jitter(rng, (170, 170, 175), 20))


def draw_aeroplane(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Top view: fuselage, swept wings, tail plane, cockpit."""
    body = pick(rng, [(235, 235, 240), (180, 185, 195), (200, 215, 235), (210, 40, 40)])
    wing = shade(body, rng.uniform(0.75, 0.95))
    d.polygon([(0.45 * w, 0.5 * h), (0.62 * w, 0.5 * h), (0.42 * w, 0.02 * h), (0.34 * w, 0.02 * h)], wing)  # fmt: skip
    d.polygon([(0.45 * w, 0.5 * h), (0.62 * w, 0.5 * h), (0.42 * w, 0.98 * h), (0.34 * w, 0.98 * h)], wing)  # fmt: skip
    d.polygon([(0.04 * w, 0.25 * h), (0.1 * w, 0.25 * h), (0.17 * w, 0.5 * h), (0.1 * w, 0.75 * h), (0.04 * w, 0.75 * h)], wing)  # fmt: skip
    d.ellipse([0.02 * w, 0.42 * h, 0.99 * w, 0.58 * h], fill=body)
    d.ellipse([0.8 * w, 0.46 * h, 0.92 * w, 0.54 * h], fill=jitter(rng, (40, 60, 90), 15))


def draw_bicycle(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Side view: two thin-rimmed wheels, a diamond frame, saddle and handlebar."""
    frame = pick(rng, [(200, 30, 30), (30, 60, 190), (20, 20, 20), (30, 150, 60), (230, 230, 230)])
    r = min(0.24 * w, 0.36 * h)
    rear, front, crank = (r + 0.01 * w, h - r - 0.01 * h), (w - r - 0.01 * w, h - r - 0.01 * h), (0.47 * w, h - r)  # fmt: skip
    seat, head = (0.4 * w, 0.3 * h), (0.72 * w, 0.25 * h)
    tyre, lw = jitter(rng, (25, 25, 25), 8), max(2, round(0.05 * h))
    for cx, cy in (rear, front):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=tyre, width=max(2, round(0.14 * r)))
        disc(d, cx, cy, 0.1 * r, tyre)
    d.line([rear, seat, crank, rear], fill=frame, width=lw, joint="curve")
    d.line([seat, head, crank], fill=frame, width=lw, joint="curve")
    d.line([head, front], fill=frame, width=lw)
    d.line([(0.34 * w, 0.2 * h), (0.47 * w, 0.2 * h)], fill=tyre, width=lw + 1)  # saddle
    d.line([head, (0.7 * w, 0.08 * h), (0.8 * w, 0.06 * h)], fill=tyre, width=lw)


def draw_bird(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Side view: body, head, beak, tail and a raised wing."""
    body = pick(rng, [(110, 75, 45), (30, 30, 35), (40, 80, 170), (190, 40, 30), (220, 190, 50), (140, 140, 140)])  # fmt: skip
    wing = shade(body, rng.uniform(0.55, 0.8))
    d.polygon([(0.05 * w, 0.42 * h), (0.3 * w, 0.55 * h), (0.25 * w, 0.75 * h), (0.02 * w, 0.62 * h)], wing)  # fmt: skip
    d.ellipse([0.15 * w, 0.4 * h, 0.78 * w, 0.9 * h], fill=body)
    disc(d, 0.78 * w, 0.38 * h, 0.18 * h, body)
    d.polygon([(0.88 * w, 0.32 * h), (0.99 * w, 0.42 * h), (0.88 * w, 0.46 * h)], jitter(rng, (230, 170, 40), 20))  # fmt: skip
    disc(d, 0.81 * w, 0.34 * h, 0.03 * h, (10, 10, 10, 255))
    lift = rng.uniform(0.02, 0.45)  # wing up (flying) or folded
    d.polygon([(0.3 * w, 0.58 * h), (0.62 * w, 0.56 * h), (0.35 * w, lift * h), (0.2 * w, (lift + 0.1) * h)], wing)  # fmt: skip


def draw_boat(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Side view: hull, mast, mainsail and jib."""
    hull = pick(rng, [(120, 70, 40), (30, 50, 120), (190, 30, 30), (235, 235, 235), (20, 20, 20)])
    sail = pick(rng, [(245, 240, 225), (250, 250, 250), (220, 60, 40), (240, 200, 60)])
    mast = jitter(rng, (90, 70, 50), 15)
    d.polygon([(0.0, 0.68 * h), (w, 0.68 * h), (0.86 * w, h), (0.12 * w, h)], hull)
    d.line([(0.5 * w, 0.02 * h), (0.5 * w, 0.7 * h)], fill=mast, width=max(2, round(0.02 * w)))
    d.polygon([(0.48 * w, 0.04 * h), (0.48 * w, 0.64 * h), (0.1 * w, 0.64 * h)], sail)
    d.polygon([(0.53 * w, 0.12 * h), (0.53 * w, 0.64 * h), (0.85 * w, 0.64 * h)], shade(sail, 0.9))
    d.line([(0.02 * w, 0.74 * h), (0.98 * w, 0.74 * h)], fill=shade(hull, 1.5), width=max(1, round(0.03 * h)))  # fmt: skip


def draw_bottle(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Front view: rounded body, shoulder, neck, cap, label band and a highlight."""
    glass = pick(rng, [(30, 110, 40), (100, 55, 20), (150, 190, 210), (20, 60, 30), (200, 80, 40)])
    r = 0.25 * w
    d.rounded_rectangle([0.02 * w, 0.36 * h, 0.98 * w, h - 1], radius=r, fill=glass)
    d.ellipse([0.02 * w, 0.26 * h, 0.98 * w, 0.48 * h], fill=glass)
    d.rectangle([0.33 * w, 0.06 * h, 0.67 * w, 0.34 * h], fill=glass)
    d.rectangle([0.3 * w, 0.0, 0.7 * w, 0.08 * h], fill=pick(rng, [(200, 170, 40), (180, 20, 20), (230, 230, 230)]))  # fmt: skip
    if rng.random() < 0.7:
        d.rectangle([0.02 * w, 0.55 * h, 0.98 * w, 0.78 * h], fill=pick(rng, [(240, 235, 215), (200, 30, 40), (30, 30, 30)]))  # fmt: skip
    d.rectangle([0.2 * w, 0.4 * h, 0.28 * w, 0.92 * h], fill=shade(glass, 1.6))


def draw_bus(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Side view: long box, a row of windows, a door and two wheels."""
    body = pick(rng, [(240, 190, 20), (200, 30, 30), (235, 235, 235), (30, 80, 170), (40, 140, 70)])
    glass = jitter(rng, (120, 170, 200), 20)
    d.rounded_rectangle([0.0, 0.02 * h, w - 1, 0.86 * h], radius=0.08 * h, fill=body)
    n = int(rng.integers(4, 8))
    for i in range(n):
        x0 = (0.16 + 0.8 * i / n) * w
        d.rectangle([x0, 0.14 * h, x0 + 0.65 * 0.8 * w / n, 0.46 * h], fill=glass)
    d.rectangle([0.03 * w, 0.14 * h, 0.12 * w, 0.8 * h], fill=shade(glass, 0.8))  # door
    d.line([(0.0, 0.6 * h), (w, 0.6 * h)], fill=shade(body, 0.7), width=max(1, round(0.04 * h)))
    r = 0.15 * h
    for cx in (0.22 * w, 0.8 * w):
        wheel(d, cx, h - r - 1, r, rng)


def draw_car(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Side view: body, cabin with windows, lights, two wheels."""
    body = pick(rng, [(200, 30, 30), (30, 60, 160), (230, 230, 230), (25, 25, 25), (150, 150, 155), (230, 200, 40)])  # fmt: skip
    d.polygon([(0.22 * w, 0.48 * h), (0.33 * w, 0.08 * h), (0.68 * w, 0.08 * h), (0.82 * w, 0.48 * h)], body)  # fmt: skip
    d.rounded_rectangle([0.0, 0.42 * h, w - 1, 0.82 * h], radius=0.12 * h, fill=body)
    glass = jitter(rng, (90, 120, 150), 20)
    d.polygon([(0.29 * w, 0.44 * h), (0.36 * w, 0.15 * h), (0.49 * w, 0.15 * h), (0.49 * w, 0.44 * h)], glass)  # fmt: skip
    d.polygon([(0.52 * w, 0.44 * h), (0.52 * w, 0.15 * h), (0.65 * w, 0.15 * h), (0.75 * w, 0.44 * h)], glass)  # fmt: skip
    d.rectangle([0.93 * w, 0.5 * h, 0.99 * w, 0.6 * h], fill=(250, 240, 180, 255))
    r = 0.18 * h
    for cx in (0.2 * w, 0.8 * w):
        wheel(d, cx, h - r - 1, r, rng)


def draw_cat(d: ImageDraw.ImageDraw, w: float, h: float, rng: np.random.Generator) -> None:
    """Side view: body, legs, raised tail, head with ears and eyes, sometimes stripes."""
    fur = pick(rng, [(210, 120, 40), (120, 120, 120), (30, 30, 30), (235, 230, 220), (110, 80, 55)])
    dark = shade(fur, 0.6)
    lw = max(2, round(0.07 * h))
    d.line([(0.12 * w, 0.55 * h), (0.04 * w, 0.3 * h), (0.08 * w, 0.05 * h)], fill=fur, width=lw, joint="curve")  # fmt: skip
    for x in (0.18, 0.3, 0.55, 0.66):
        d.rectangle([x * w, 0.6 * h, (x + 0.07) * w, h - 1], fill=shade(fur, 0.9))
    d.ellipse([0.08 * w, 0.38 * h, 0.78 * w, 0.82 * h], fill=fur)
    if rng.random() < 0.5:
        for x in (0.25, 0.35, 0.45, 0.55):
            d.line([(x * w, 0.4 * h), ((x - 0.03) * w, 0.7 * h)], fill=dark, width=max(1, lw // 2))
    hr = 0.2 * h
    hx, hy = 0.8 * w, 0.32 * h
    d.polygon([(hx - hr, hy - 0.3 * hr), (hx - 0.75 * hr, hy - 1.7 * hr), (hx - 0.1 * hr, hy - 0.8 * hr)], fur)  # fmt: skip
    d.polygon([(hx + hr, hy - 0.3 * hr), (hx + 0.75 * hr, hy - 1.7 * hr), (hx + 0.1 * hr, hy - 0.8 * hr)], fur)  # fmt: skip
    disc(d, hx, hy, hr, fur)
    eye = jitter(rng, (120, 180, 60), 30)
    for ex in (hx - 0.4 * hr, hx + 0.4 * hr):
        disc(d, ex, hy - 0.1 * hr, 0.18 * hr, eye)


@dataclass(frozen=True)
class ShapeFamily:
    draw: Callable[[ImageDraw.ImageDraw, float, float, np.random.Generator], None]
    aspect: tuple[float, float]  # width / height of the unrotated sprite
    max_rotation: float  # degrees


FAMILIES: dict[str, ShapeFamily] = {
    "aeroplane": ShapeFamily(draw_aeroplane, (1.1, 1.6), 180.0),
    "bicycle": ShapeFamily(draw_bicycle, (1.4, 1.8), 10.0),
    "bird": ShapeFamily(draw_bird, (1.0, 1.5), 30.0),
    "boat": ShapeFamily(draw_boat, (0.8, 1.3), 10.0),
    "bottle": ShapeFamily(draw_bottle, (0.3, 0.45), 15.0),
    "bus": ShapeFamily(draw_bus, (1.7, 2.4), 6.0),
    "car": ShapeFamily(draw_car, (1.6, 2.2), 8.0),
    "cat": ShapeFamily(draw_cat, (1.1, 1.6), 15.0),
}


def render_sprite(name: str, rng: np.random.Generator, size: float) -> tuple[np.ndarray, str]:
    """One object of class ``name`` about ``size`` px across (sqrt of its box area).

    Returns (rgba float [h, w, 4] with alpha in 0..1, VOC pose). Drawn 4x larger, shaded by a linear
    gradient, rotated and flipped there, then box-filtered down: edges are anti-aliased.
    """
    fam = FAMILIES[name]
    aspect = rng.uniform(*fam.aspect)
    w, h = size * math.sqrt(aspect) * SUPERSAMPLE, size / math.sqrt(aspect) * SUPERSAMPLE
    canvas = Image.new("RGBA", (math.ceil(w), math.ceil(h)), (0, 0, 0, 0))
    fam.draw(ImageDraw.Draw(canvas), w, h, rng)
    rgba = np.asarray(canvas, dtype=np.float64)
    yy, xx = np.mgrid[0 : rgba.shape[0], 0 : rgba.shape[1]]
    angle = rng.uniform(0, 2 * np.pi)  # light from a random side
    t = (xx / rgba.shape[1] - 0.5) * math.cos(angle) + (yy / rgba.shape[0] - 0.5) * math.sin(angle)
    rgba[..., :3] *= (1.0 + rng.uniform(0.2, 0.5) * t)[..., None]
    canvas = Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8), "RGBA")
    flipped = bool(rng.random() < 0.5)
    if flipped:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rotation = rng.uniform(-fam.max_rotation, fam.max_rotation)
    canvas = canvas.rotate(rotation, Image.Resampling.BICUBIC, expand=True)
    small = (max(1, round(canvas.width / SUPERSAMPLE)), max(1, round(canvas.height / SUPERSAMPLE)))
    canvas = canvas.resize(small, Image.Resampling.BOX)
    out = np.asarray(canvas, dtype=np.float64)
    out[..., 3] /= 255.0
    pose = "Unspecified" if name in ("bottle", "aeroplane") else ("Left" if flipped else "Right")
    return out, pose


# ------------------------------------------------------------------------------------ one image
@dataclass
class PlacedObject:
    name: str
    pose: str
    alpha: np.ndarray  # float [H, W] in 0..1, this object alone on the full image
    rgb: np.ndarray  # float [H, W, 3], its colours (where alpha > 0)
    truncated: bool


def place(rng: np.random.Generator, name: str, h: int, w: int) -> PlacedObject:
    size = rng.uniform(0.28, 0.65) * min(h, w)
    sprite, pose = render_sprite(name, rng, size)
    sh, sw = sprite.shape[:2]
    # centre anywhere that keeps at least ~3/4 of the sprite's extent inside
    cx = rng.uniform(sw * 0.25, max(sw * 0.25 + 1, w - sw * 0.25))
    cy = rng.uniform(sh * 0.25, max(sh * 0.25 + 1, h - sh * 0.25))
    x0, y0 = round(cx - sw / 2), round(cy - sh / 2)
    big = np.zeros((h + 2 * sh, w + 2 * sw, 4))
    big[y0 + sh : y0 + 2 * sh, x0 + sw : x0 + 2 * sw] = sprite
    full = big[sh : sh + h, sw : sw + w]
    inside = full[..., 3].sum()
    truncated = bool(sprite[..., 3].sum() - inside > 0.02 * sprite[..., 3].sum())
    return PlacedObject(name, pose, full[..., 3].copy(), full[..., :3].copy(), truncated)


def visible_masks(objects: list[PlacedObject]) -> list[np.ndarray]:
    """Each object's visible hard mask (alpha >= 0.5, not covered by a later object)."""
    masks, covered = [], np.zeros_like(objects[0].alpha, dtype=bool) if objects else None
    for obj in reversed(objects):
        hard = obj.alpha >= 0.5
        masks.append(hard & ~covered)
        covered = covered | hard
    return masks[::-1]


def void_band(instance: np.ndarray) -> np.ndarray:
    """Pixels within 1 px of a label change: the VOC 'void' outline."""
    return ndimage.maximum_filter(instance, 3) != ndimage.minimum_filter(instance, 3)


def instance_map(masks: list[np.ndarray]) -> np.ndarray:
    inst = np.zeros(masks[0].shape, dtype=np.uint8)
    for i, m in enumerate(masks, 1):
        inst[m] = i
    return inst


def acceptable(masks: list[np.ndarray], objects: list[PlacedObject]) -> bool:
    """Every object stays recognisable: enough visible pixels, also outside the void band."""
    inst = instance_map(masks)
    interior = np.where(void_band(inst), 0, inst)
    for i, (m, obj) in enumerate(zip(masks, objects), 1):
        full = (obj.alpha >= 0.5).sum()
        if m.sum() < 60 or m.sum() < 0.3 * full or (interior == i).sum() < 25:
            return False
    return True


def draw_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[PlacedObject]]:
    """Background + 1-4 objects; returns (uint8 [h, w, 3], objects bottom to top)."""
    image = background(rng, h, w)
    n = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1]))
    objects: list[PlacedObject] = []
    for _ in range(n):
        name = objects[-1].name if objects and rng.random() < 0.3 else CLASSES[rng.integers(len(CLASSES))]  # fmt: skip
        for _attempt in range(6):
            obj = place(rng, name, h, w)
            if acceptable(visible_masks([*objects, obj]), [*objects, obj]):
                objects.append(obj)
                break
    for obj in objects:
        a = obj.alpha[..., None]
        image = image * (1 - a) + obj.rgb * a
    image = image + rng.normal(0, 2.0, image.shape)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def annotation_xml(image_id: str, h: int, w: int, objects: list[dict], segmented: bool) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "MiniVOC (procedural)"
    ET.SubElement(source, "annotation").text = "MiniVOC"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = str(int(segmented))
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = obj["pose"]
        ET.SubElement(node, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(node, "difficult").text = str(int(obj["difficult"]))
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["bbox"]):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root, "\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def palette_png(labels: np.ndarray) -> bytes:
    im = Image.fromarray(labels, "P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render_image(voc: Path, index: int, params: Params, segmented: bool) -> dict:
    """Draws image ``index`` and writes its JPEG, XML and (if ``segmented``) PNGs.

    Returns {"id", "objects": [(name, difficult)]} for the ImageSets.
    """
    rng = np.random.default_rng([params.seed, index])
    lo, hi = params.size_range
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    image, objects = draw_scene(rng, h, w)
    image_id = f"{index + 1:06d}"
    masks = visible_masks(objects)
    records = []
    for obj, m in zip(objects, masks):
        ys, xs = np.nonzero(m)
        full = (obj.alpha >= 0.5).sum()
        # VOC marks hard-to-recognise objects difficult: here small or mostly hidden ones
        difficult = bool(m.sum() < 0.012 * h * w or m.sum() < 0.5 * full)
        bbox = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        records.append(dict(name=obj.name, pose=obj.pose, truncated=obj.truncated, difficult=difficult, bbox=bbox))  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(buf.getvalue())
    (voc / "Annotations" / f"{image_id}.xml").write_bytes(
        annotation_xml(image_id, h, w, records, segmented)
    )
    if segmented:
        inst = instance_map(masks) if masks else np.zeros((h, w), np.uint8)
        void = void_band(inst)
        cls = np.zeros_like(inst)
        for i, obj in enumerate(objects, 1):
            cls[inst == i] = VOC_CLASSES.index(obj.name) + 1
        inst[void], cls[void] = VOID, VOID
        (voc / "SegmentationObject" / f"{image_id}.png").write_bytes(palette_png(inst))
        (voc / "SegmentationClass" / f"{image_id}.png").write_bytes(palette_png(cls))
    return {"id": image_id, "objects": [(r["name"], r["difficult"]) for r in records]}


# ------------------------------------------------------------------------------ splits and files
def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def write_image_sets(voc: Path, records: list[dict], splits: dict[str, list[int]], seg: dict[str, list[int]]) -> None:  # fmt: skip
    main, segdir = voc / "ImageSets" / "Main", voc / "ImageSets" / "Segmentation"
    for split, idx in splits.items():
        write_lines(main / f"{split}.txt", [records[i]["id"] for i in idx])
        for name in CLASSES:
            lines = []
            for i in idx:
                flags = [diff for n, diff in records[i]["objects"] if n == name]
                label = -1 if not flags else (0 if all(flags) else 1)
                lines.append(f"{records[i]['id']} {label:2d}")
            write_lines(main / f"{name}_{split}.txt", lines)
    for split, idx in seg.items():
        write_lines(segdir / f"{split}.txt", [records[i]["id"] for i in idx])


def split_indices(params: Params) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Main splits ~50/25/25 train/val/test and Segmentation train/val subsets, sorted."""
    rng = np.random.default_rng([params.seed, 2**31])
    perm = rng.permutation(params.n_images)
    n_train, n_val = round(0.5 * params.n_images), round(0.25 * params.n_images)
    train, val = sorted(perm[:n_train].tolist()), sorted(perm[n_train : n_train + n_val].tolist())
    test = sorted(perm[n_train + n_val :].tolist())
    seg_train = sorted(i for i in train if rng.random() < params.seg_fraction)
    seg_val = sorted(i for i in val if rng.random() < params.seg_fraction)
    main = {"train": train, "val": val, "trainval": sorted(train + val), "test": test}
    return main, {"train": seg_train, "val": seg_val, "trainval": sorted(seg_train + seg_val)}


def read_stamp(voc: Path) -> dict | None:
    try:
        return json.loads((voc / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _render_chunk(args: tuple[str, list[int], Params, set[int]]) -> list[dict]:
    voc, indices, params, segmented = args
    return [render_image(Path(voc), i, params, i in segmented) for i in indices]


def generate(
    out: str | Path,
    n_images: int = DEFAULT_N_IMAGES,
    seed: int = 0,
    size_range: tuple[int, int] = (96, 160),
    seg_fraction: float = 0.5,
    workers: int | None = None,
) -> Path:
    """Writes (or finds) MiniVOC under ``out`` and returns ``out/VOC2007``.

    ``workers`` processes draw the images (default: all CPUs); the result does not depend on it.
    """
    if n_images < 4:
        raise ValueError(f"n_images must be >= 4 (one image per split), got {n_images}")
    lo, hi = size_range
    if not 32 <= lo <= hi:
        raise ValueError(f"size_range must satisfy 32 <= min <= max, got {size_range}")
    params = Params(n_images, seed, (int(lo), int(hi)), float(seg_fraction))
    out = Path(out)
    voc = out / "VOC2007"
    want = asdict(params) | {"size_range": list(params.size_range), "classes": list(CLASSES)}
    if read_stamp(voc) == want:
        return voc
    if voc.exists() and read_stamp(voc) is None and any(voc.iterdir()):
        raise FileExistsError(f"{voc} exists but was not written by minivoc ({STAMP} missing); "
                              "refusing to overwrite it")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".VOC2007.tmp-*"):  # left by a killed run
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".VOC2007.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject",
                "ImageSets/Main", "ImageSets/Segmentation"):  # fmt: skip
        (tmp / sub).mkdir(parents=True)
    try:
        splits, seg = split_indices(params)
        segmented = set(seg["trainval"])
        workers = workers or os.cpu_count() or 1
        if multiprocessing.current_process().daemon:  # e.g. inside a DataLoader worker
            workers = 1
        background_sources()  # loaded once here; forked workers inherit it
        chunks = [list(range(k, n_images, workers)) for k in range(workers)]
        jobs = [(str(tmp), c, params, segmented) for c in chunks if c]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = [r for chunk in pool.map(_render_chunk, jobs) for r in chunk]
        else:
            results = [r for job in jobs for r in _render_chunk(job)]
        records = sorted(results, key=lambda r: r["id"])
        write_image_sets(tmp, records, splits, seg)
        (tmp / STAMP).write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
        _install(tmp, voc, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return voc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, voc: Path, want: dict) -> None:
    """Rename the finished tree into place; an older MiniVOC there is moved aside and deleted."""
    old = voc.with_name(f".VOC2007.old-{os.getpid()}")
    if voc.exists():
        if read_stamp(voc) == want:  # a concurrent run finished first: same bytes
            return
        voc.rename(old)
    try:
        tmp.rename(voc)
    except OSError:
        if read_stamp(voc) != want:
            raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/minivoc"))
    parser.add_argument("--n-images", type=int, default=DEFAULT_N_IMAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=96)
    parser.add_argument("--max-side", type=int, default=160)
    parser.add_argument("--seg-fraction", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    voc = generate(args.out, args.n_images, args.seed, (args.min_side, args.max_side),
                   args.seg_fraction, args.workers)  # fmt: skip
    print(f"{voc}: {args.n_images} images ready in {time.perf_counter() - start:.1f} s")
    return voc


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
