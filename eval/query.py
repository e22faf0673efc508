"""Nearest images of a query image in a dataset, by a pretext checkpoint's encoder features.

    python -m eval.query --checkpoint runs/ce --data data/minivoc/VOC2007 --image cat.jpg \
        [--box x0,y0,x1,y1] [--k 8] [--layer pool5] [--out grid.png]

Prints one line per neighbour (``rank  id  distance``, best first) and writes a PNG of one row:
query | neighbours. ``--data``: a VOC root (``--split`` names an ``ImageSets/Main`` split, default ``trainval``) or a
folder of images, flat or in class subfolders (``--split``: a subfolder or a split file; default
all of it). Both the query and the dataset images are seen in the eval view (short side
resized to the model's input size S, centre crop). Database features come from the cache of
:mod:`eval.features`, so a second query costs one forward pass.

``--box``: pixel coordinates in the query file (0-based, x1 and y1 exclusive). The box is removed
(filled with the training mean) and only its context is encoded, in the query and, at the same
place, in every database image: the paper's Fig. 8 ("context nearest neighbours"). A box that
misses the centre crop (the part of the image the model sees) is refused with one error line.

``--images.strict`` / ``--images.skip_bad``: the intake rule of every stage (core.images,
docs/images.md): refuse non-RGB images instead of converting them; leave bad files out (counted).

Distances: squared L2 between L2-normalised features (``--no-normalize``: raw features), or inner
products with ``--metric ip`` (larger is closer).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.cli import ArgumentParser, UserError
from core.data import fill_holes, to_unit_range
from core.datasets import eval_view
from core.features import DEFAULT_CACHE_DIR, FLAT_LAYERS, l2_normalize, layer_features
from core.images import ImagesConfig, load_rgb
from core.index import INDEX_KINDS, METRICS, build_index, search
from core.inpainting import save_grid
from core.pretrained import Pretrained
from core.splits import is_voc_root, open_split
from eval.features import extract_features


@dataclass
class QueryConfig:
    checkpoint: str
    data: str
    image: str
    box: tuple[int, int, int, int] | None = None
    k: int = 8
    layer: str = "pool5"
    split: str | None = None  # None: trainval of a VOC root, every image of a folder
    out: str | None = None
    normalize: bool = True
    metric: str = "l2"
    index: str = "flat"
    cache_dir: str = DEFAULT_CACHE_DIR
    images: ImagesConfig = field(default_factory=ImagesConfig)


class QueryError(UserError):
    """A query the image cannot answer (a box outside the part the model sees)."""


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--box {text!r}: expected four integers x0,y0,x1,y1"
        ) from None
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"--box {text!r}: needs x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def parse_config(argv: list[str] | None = None) -> QueryConfig:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pretext run folder or .pt file")
    p.add_argument(
        "--data",
        required=True,
        help="VOC root (JPEGImages/, ImageSets/Main/) or a folder of images",
    )
    p.add_argument("--image", required=True, help="query image file")
    p.add_argument("--box", type=parse_box, help="x0,y0,x1,y1: encode only the context of this box")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--layer", choices=FLAT_LAYERS, default="pool5")
    p.add_argument(
        "--split",
        help="the images searched: a VOC split name (default trainval), a subfolder or a split file "
        "of --data (default for a folder: all of it)",
    )
    p.add_argument("--out", help="grid PNG (query | neighbours)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--metric", choices=METRICS, default="l2")
    p.add_argument("--index", choices=INDEX_KINDS, default="flat")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument(
        "--images.strict",
        dest="strict",
        action="store_true",
        help="refuse non-RGB images instead of converting them (core.images)",
    )
    p.add_argument("--images.skip_bad", dest="skip_bad", action="store_true",
                   help="leave bad image files out (counted in the log)")  # fmt: skip
    args = vars(p.parse_args(argv))
    if args["k"] < 1:
        p.error(f"--k must be >= 1, got {args['k']}")
    rule = ImagesConfig(strict=args.pop("strict"), skip_bad=args.pop("skip_bad"))
    return QueryConfig(**args, images=rule)


def box_to_view_hole(
    box: tuple[int, int, int, int], height: int, width: int, size: int
) -> np.ndarray:
    """The hole [S, S] bool that ``box`` (in a height x width image) covers in its eval view."""
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x0, y0, x1, y1 = box
    vx0 = math.floor(x0 * new_w / width) - left
    vx1 = math.ceil(x1 * new_w / width) - left
    vy0 = math.floor(y0 * new_h / height) - top
    vy1 = math.ceil(y1 * new_h / height) - top
    vx0, vy0 = max(vx0, 0), max(vy0, 0)
    vx1, vy1 = min(vx1, size), min(vy1, size)
    if vx1 <= vx0 or vy1 <= vy0:
        x_lo, x_hi = left * width / new_w, (left + size) * width / new_w
        y_lo, y_hi = top * height / new_h, (top + size) * height / new_h
        raise QueryError(
            f"--box {','.join(map(str, box))}: lies outside the centre crop the model sees of the "
            f"{width}x{height} image (x {x_lo:.0f}..{x_hi:.0f}, y {y_lo:.0f}..{y_hi:.0f})"
        )
    hole = np.zeros((size, size), dtype=bool)
    hole[vy0:vy1, vx0:vx1] = True
    return hole


def main(cfg: QueryConfig) -> dict[str, float]:
    """Prints and returns the k nearest images: {image id: distance}, best first."""
    pre = Pretrained.load(cfg.checkpoint)
    model = pre.network().eval()
    size = model.input_size
    split = cfg.split if cfg.split is not None else "trainval" if is_voc_root(cfg.data) else ""
    raw = load_rgb(cfg.image, strict=cfg.images.strict)
    hole = None if cfg.box is None else box_to_view_hole(cfg.box, *raw.shape[:2], size)
    query = torch.from_numpy(np.array(eval_view(raw, size))).permute(2, 0, 1)[None]
    qfeat = layer_features(model, query, (cfg.layer,), None, hole, pre.data_mean)[cfg.layer]
    db = extract_features(pre, cfg.data, split, cfg.layer, hole, cfg.cache_dir, rule=cfg.images)
    dbfeat = db.features
    if cfg.normalize:
        qfeat, dbfeat = l2_normalize(qfeat), l2_normalize(dbfeat)
    index = build_index(dbfeat, cfg.index, cfg.metric)
    dist, rows = search(index, qfeat, cfg.k)
    found = [(db.ids[r], float(d)) for r, d in zip(rows[0], dist[0]) if r >= 0]
    for rank, (image_id, d) in enumerate(found, 1):
        print(f"{rank:3d}  {image_id}  {d:.6f}")
    if cfg.out:
        images = open_split(cfg.data, split, size, False, rule=cfg.images)
        shown = to_unit_range(query)
        if hole is not None:  # show what the encoder saw: the box filled with the mean
            mean = torch.tensor(pre.data_mean, dtype=torch.float32)
            shown = fill_holes(shown, torch.from_numpy(hole)[None, None], mean)
        cells = [shown.add(1).div(2).clamp(0, 1)]
        cells += [images[int(r)][None].float() / 255 for r in rows[0] if r >= 0]
        labels = ["query", *(f"#{j}" for j in range(1, len(cells)))]
        save_grid(Path(cfg.out), tuple(cells), labels=labels)
        print(f"wrote {cfg.out}")
    return dict(found)


if __name__ == "__main__":
    from core.cli import run_cli

    logging.basicConfig(level=logging.WARNING)
    run_cli(lambda: main(parse_config()))
