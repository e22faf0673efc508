"""Random resized crops, flips and region masks for a whole batch at once, on the model's device.

The per-image path (``core.datasets.train_view`` + ``core.masks.MaskGenerator``) does the same
work image by image in loader workers; here the per-sample *parameters* are drawn on the host from
one ``numpy.random.Generator`` per sample (seeded by ``core.data.sample_seed(seed, step, slot)``,
so a sample is a function of (seed, step, slot) and resume stays exact), and the *pixels* are
made by a few batched tensor ops on the device:

- crop + flip: torchvision's ``RandomResizedCrop.get_params`` rule (scale 0.4-1, ratio 3/4-4/3,
  10 tries then the centre crop) drawn per sample; one ``grid_sample`` (bilinear, pixel centres as
  PIL's resize, edge pixels replicated) turns every box into an S x S image, the flip folded into
  the sampling grid. Not antialiased where a box is larger than S (PIL's resize is): crops from a
  store whose short side is S shrink by at most the image's aspect ratio.
- random region (§3.3): the silhouette bank is held on the device, flattened; each candidate
  piece (shape, size, aspect, rotation +-45 deg, flip, place: the draws of
  ``core.masks.random_region_mask``) is rendered by one gather over every box pixel of every
  candidate of the batch (the nearest-neighbour inverse warp of ``core.masks._deform``), and the
  rule "add a piece only while the union stays at or below max_coverage, stop once the target
  coverage is reached" runs as one vectorised acceptance step per candidate slot, over the batch.
- random blocks likewise (rectangles, no silhouette); the central square is one constant mask.

The hole fill ``(1 - M) * x + M * mean`` is ``core.data.fill_holes``, which the training step
already runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.datasets import CROP_RATIO, CROP_SCALE
from core.masks import MASK_KINDS, builtin_shapes, central_mask, shrink_shape

REGION_TRIES = 4 * 6  # random_region_mask: 4 * max_shapes candidates
BLOCK_TRIES = 4 * 8  # random_block_mask: 4 * max_blocks candidates
ROUND = 4  # candidate slots rendered together: most holes are done within 4 to 8


def draw_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip): torchvision's RandomResizedCrop.get_params rule, drawn from ``rng``
    (transforms/v2/_geometry.py: 10 tries of area and log-ratio, else the centre crop)."""
    area = height * width
    u = rng.random((10, 2))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for target_u, ratio_u in u:
        target = area * (scale[0] + (scale[1] - scale[0]) * target_u)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ratio_u)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            uy, ux = rng.random(2)
            top, left = int(uy * (height - h + 1)), int(ux * (width - w + 1))
            return top, left, h, w, bool(rng.random() < 0.5)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, bool(rng.random() < 0.5)


def pad_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 [h_i, w_i, 3] images -> uint8 [N, H, W, 3] (H, W the largest), each padded by
    repeating its last row and column, so bilinear sampling at its edge sees only its own pixels."""
    hp = max(im.shape[0] for im in images)
    wp = max(im.shape[1] for im in images)
    out = np.empty((len(images), hp, wp, 3), np.uint8)
    for n, im in enumerate(images):
        h, w = im.shape[:2]
        out[n, :h, :w] = im
        out[n, :h, w:] = im[:, w - 1 : w]
        out[n, h:] = out[n, h - 1 : h]
    return out


def resized_crops(
    padded: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, size: int
) -> torch.Tensor:
    """padded: uint8 [N, H, W, 3] (any device); boxes: [N, 4] (top, left, h, w) px; flips: [N]
    bool -> uint8 [N, 3, size, size]: each box resized to size x size (bilinear), flipped where
    asked. Output pixel j samples the box at left + (j + 0.5) * w / size, as PIL's resize does."""
    n, hp, wp, _ = padded.shape
    top, left, h, w = (boxes[:, k].astype(np.float64)[:, None] for k in range(4))
    centres = (np.arange(size) + 0.5) / size
    cols = np.where(flips[:, None], centres[::-1], centres)
    gx = 2 * (left + cols * w) / wp - 1  # grid_sample's align_corners=False normalisation
    gy = 2 * (top + centres * h) / hp - 1
    dev = padded.device
    gx_t = torch.from_numpy(gx.astype(np.float32)).to(dev)
    gy_t = torch.from_numpy(gy.astype(np.float32)).to(dev)
    grid = torch.stack(
        (gx_t[:, None, :].expand(n, size, size), gy_t[:, :, None].expand(n, size, size)), dim=-1
    )
    x = torch.empty((n, 3, hp, wp), dtype=torch.float32, device=dev)
    x.copy_(padded.permute(0, 3, 1, 2))  # convert and lay out NCHW in one pass
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def pil_resized_crop(image: np.ndarray, box: Sequence[int], flip: bool, size: int) -> np.ndarray:
    """uint8 [h, w, 3], box (top, left, h, w) -> uint8 [size, size, 3]: the box resized (PIL
    bilinear, antialiased: torchvision's resized_crop of a PIL image), flipped if asked. The CPU
    counterpart of :func:`resized_crops`, per sample (faster there: docs/decisions.md)."""
    top, left, h, w = (int(v) for v in box)
    im = Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def _count_at_least(fraction: np.ndarray, n: int) -> np.ndarray:
    """Smallest integer c with c / n >= fraction (float64, as the per-image code compares)."""
    c = np.ceil(fraction * n).astype(np.int64)
    c -= (c - 1) / n >= fraction  # the float division may land either side of the ceiling
    c += c / n < fraction
    return c


def _count_at_most(fraction: float, n: int) -> int:
    """Largest integer c with c / n <= fraction."""
    c = int(math.floor(fraction * n))
    while (c + 1) / n <= fraction:
        c += 1
    while c / n > fraction:
        c -= 1
    return c


class BatchedMasks:
    """Holes for a batch, ``draw(rngs) -> bool [N, 1, S, S]`` on ``device``: the kinds of
    :data:`core.masks.MASK_KINDS` with the semantics of :class:`core.masks.MaskGenerator`."""

    def __init__(
        self,
        kind: str,
        size: int,
        overlap: int = 4,
        max_coverage: float = 0.25,
        shapes: Sequence[np.ndarray] = (),
        device: str | torch.device = "cpu",
    ):
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
        self.kind, self.size, self.max_coverage = kind, size, max_coverage
        self.overlap, self.shapes = overlap, shapes
        self.device = torch.device(device)
        n = size * size
        self.max_count = _count_at_most(max_coverage, n)
        if kind == "central":
            self.central = torch.from_numpy(central_mask(size, overlap)).to(self.device)
        if kind == "random_region":
            bank = [shrink_shape(s) for s in (shapes or builtin_shapes())]
            self.shape_hw = np.array([s.shape for s in bank], np.int64)
            self.shape_off = np.concatenate([[0], np.cumsum(self.shape_hw.prod(1))[:-1]])
            flat = np.concatenate([s.ravel() for s in bank])
            self.bank = torch.from_numpy(flat).to(self.device)  # the silhouettes, on the device
            self.n_shapes = len(bank)

    def draw(self, rngs: Sequence[np.random.Generator]) -> torch.Tensor:
        """One hole per generator (each draws this sample's parameters), bool [N, 1, S, S]."""
        s = self.size
        if self.kind == "central":
            return self.central.expand(len(rngs), 1, s, s).clone()
        if self.kind == "none":
            return torch.zeros((len(rngs), 1, s, s), dtype=torch.bool, device=self.device)
        mc = self.max_coverage
        targets = np.array([rng.uniform(mc / 2, mc) for rng in rngs])
        tries = REGION_TRIES if self.kind == "random_region" else BLOCK_TRIES
        width = 7 if self.kind == "random_region" else 4
        u = np.stack([rng.random((tries, width)) for rng in rngs])  # [N, K, width]
        params = self._region(u) if self.kind == "random_region" else self._block(u)
        return self._accept(params, _count_at_least(targets, s * s)).view(len(rngs), 1, s, s)

    def _block(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """random_block_mask's draws: sides in [S/10, S/3] px, then the place."""
        s = self.size
        lo, hi = max(2, s // 10), max(3, s // 3)
        h = lo + np.floor(u[..., 0] * (hi - lo + 1)).astype(np.int64)
        w = lo + np.floor(u[..., 1] * (hi - lo + 1)).astype(np.int64)
        y = np.floor(u[..., 2] * (s - h + 1)).astype(np.int64)
        x = np.floor(u[..., 3] * (s - w + 1)).astype(np.int64)
        return {"h": h, "w": w, "y": y, "x": x}

    def _region(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """random_region_mask's draws: shape, side 0.2-0.6 S, aspect e^U(-.5,.5), angle, flip, place."""
        s = self.size
        shape = np.minimum((u[..., 0] * self.n_shapes).astype(np.int64), self.n_shapes - 1)
        side = (0.2 + 0.4 * u[..., 1]) * s
        aspect = np.exp(u[..., 2] - 0.5)
        h = np.clip(side * aspect, 2, s).astype(np.int64)  # int(min(max(., 2), S)) of masks.py
        w = np.clip(side / aspect, 2, s).astype(np.int64)
        y = np.floor(u[..., 5] * (s - h + 1)).astype(np.int64)
        x = np.floor(u[..., 6] * (s - w + 1)).astype(np.int64)
        theta = (u[..., 3] - 0.5) * (np.pi / 2)
        flip = np.where(u[..., 4] < 0.5, -1.0, 1.0)
        return {"h": h, "w": w, "y": y, "x": x, "shape": shape, "theta": theta, "flip": flip}

    def _pieces(self, p: dict[str, np.ndarray], rows: np.ndarray, ks: np.ndarray, spare: int):
        """Canvas positions (flat, into [N * S * S]; ``spare`` for a box pixel outside the piece)
        of every box pixel of candidate slot ``ks[j]`` of sample ``rows[j]``, in that order, and
        for each pixel its j.

        Two-level ragged: per box row, the warp is an affine function of the column, so the
        per-pixel work is one gather of its row's coefficients, two multiply-adds and a floor."""
        s, dev = self.size, self.device
        h, w = p["h"][rows, ks], p["w"][rows, ks]
        row_cand = np.repeat(np.arange(len(rows)), h)  # box rows, on the host (few thousand)
        r = np.arange(len(row_cand)) - np.repeat(np.cumsum(h) - h, h)
        wr = w[row_cand]
        canvas_row = (rows * s * s + p["y"][rows, ks] * s + p["x"][rows, ks])[row_cand] + r * s
        ints = [canvas_row, row_cand]
        floats = []
        if "shape" in p:
            # core.masks._deform with its per-candidate constants folded: source row
            # iy = floor(ay * r + by * c + cy), column ix = floor(ax * r + bx * c + cx)
            theta, flip = p["theta"][rows, ks], p["flip"][rows, ks]
            sh, sw = (self.shape_hw[p["shape"][rows, ks], j].astype(np.float64) for j in (0, 1))
            cos, sin = np.cos(theta), np.sin(theta)
            kfit = np.abs(cos) + np.abs(sin)
            y0, x0 = 0.5 / h - 0.5, flip * (0.5 / w - 0.5)
            ay, by = sh * kfit * cos / h, -sh * kfit * sin * flip / w
            cy = sh * kfit * (cos * y0 - sin * x0) + 0.5 * sh
            ax, bx = sw * kfit * sin / h, sw * kfit * cos * flip / w
            cx = sw * kfit * (sin * y0 + cos * x0) + 0.5 * sw
            c = row_cand
            floats = [ay[c] * r + cy[c], by[c], ax[c] * r + cx[c], bx[c]]
            ints += [
                self.shape_off[p["shape"][rows, ks]][c],
                sh[c].astype(np.int64),
                sw[c].astype(np.int64),
            ]
        wr_t = torch.from_numpy(wr).to(dev)
        pix_row = torch.repeat_interleave(torch.arange(len(wr), device=dev), wr_t)
        start = torch.from_numpy(np.cumsum(wr) - wr).to(dev)
        col = torch.arange(len(pix_row), device=dev) - start.index_select(0, pix_row)

        def per_pixel(a: np.ndarray) -> torch.Tensor:  # 1-D gathers: faster than 2-D on the CPU
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev).index_select(0, pix_row)

        canvas, cand = per_pixel(canvas_row) + col, per_pixel(row_cand)
        if not floats:
            return canvas, cand
        colf = col.float()
        fy, fx = (per_pixel(np.stack(f, 1).astype(np.float32)) for f in (floats[:2], floats[2:]))
        iy = torch.floor(torch.addcmul(fy[:, 0], colf, fy[:, 1])).long()
        ix = torch.floor(torch.addcmul(fx[:, 0], colf, fx[:, 1])).long()
        off, sh_p, sw_p = (per_pixel(a) for a in ints[2:])
        inside = (iy >= 0) & (iy < sh_p) & (ix >= 0) & (ix < sw_p)
        src = torch.where(inside, off + iy * sw_p + ix, 0)
        on = inside & self.bank.index_select(0, src)
        # no compaction (boolean indexing is slow on the CPU): an off pixel points at the spare
        # last cell of the canvas, which is always set
        return torch.where(on, canvas, spare), cand

    def _accept(self, p: dict[str, np.ndarray], target_count: np.ndarray) -> torch.Tensor:
        """The per-image rule, vectorised over the batch: for each candidate slot k, the samples
        still below their target add candidate k if the union stays within max_coverage."""
        n_samples, tries = p["h"].shape
        spare = n_samples * self.size**2
        hole = torch.zeros(spare + 1, dtype=torch.bool, device=self.device)
        hole[spare] = True
        count = np.zeros(n_samples, np.int64)
        for k0 in range(0, tries, ROUND):
            rows = np.flatnonzero(count < target_count)
            if not len(rows):
                break
            # render ROUND slots of every sample still active at once (few ops, little waste)
            slots = np.arange(k0, min(k0 + ROUND, tries))
            ks, cr = np.repeat(slots, len(rows)), np.tile(rows, len(slots))
            canvas, cand = self._pieces(p, cr, ks, spare)
            per_slot = (p["h"][cr, ks] * p["w"][cr, ks]).reshape(len(slots), len(rows)).sum(1)
            bounds = np.concatenate([[0], np.cumsum(per_slot)])
            for j in range(len(slots)):
                active = count[rows] < target_count[rows]
                if not active.any():
                    break
                seg = slice(int(bounds[j]), int(bounds[j + 1]))
                cv, cd = canvas[seg], cand[seg] - j * len(rows)
                fresh = ~hole.index_select(0, cv)
                new = torch.bincount(cd, weights=fresh.float(), minlength=len(rows))
                new = new.cpu().numpy().astype(np.int64)
                ok = active & (count[rows] + new <= self.max_count)
                keep = fresh & torch.from_numpy(ok).to(self.device).index_select(0, cd)
                hole[torch.where(keep, cv, spare)] = True
                count[rows] += np.where(ok, new, 0)
        return hole[:spare]
