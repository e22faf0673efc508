"""Inpainting quality with central masks, computed as in the paper's Table 1.

Over the hole pixels only, with pixel values in [0, 1]: mean L1, mean L2, and PSNR = 10 log10(1 / L2)
of the mean squared error per image, averaged over images. Also an image grid PNG:
masked input | output | ground truth, one row per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset

from core.atomic_io import atomic_save
from core.data import fill_holes, to_unit_range
from core.masks import central_mask, central_square
from core.models import ContextEncoder


def hole_errors(
    filled: torch.Tensor, truth: torch.Tensor, hole: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image L1, L2 and PSNR over the hole. filled, truth: [N, 3, S, S] in [0, 1]; hole: [S, S]."""
    hole = hole.bool()
    diff = (filled - truth)[:, :, hole]  # [N, 3, P]
    l1 = diff.abs().mean(dim=(1, 2))
    l2 = diff.pow(2).mean(dim=(1, 2))
    psnr = 10 * torch.log10(1.0 / l2.clamp_min(1e-10))
    return {"l1": l1, "l2": l2, "psnr": psnr}


def region_scores(
    filled: torch.Tensor, truth: torch.Tensor, region: torch.Tensor
) -> dict[str, float]:
    """Table-1 scores over ``region`` ([S, S] bool) of N images ([N, 3, S, S] in [0, 1]):
    ``l1``, ``l2`` (mean absolute / squared error, every image weighing the same: per-image and
    pooled means coincide since each image has as many region pixels), ``psnr`` (the mean over
    images of each image's PSNR, the paper-comparable convention) and ``psnr_pooled`` (the PSNR of
    the mean L2 over all images, <= ``psnr`` by Jensen's inequality)."""
    errors = hole_errors(filled, truth, region)
    l2 = float(errors["l2"].mean())
    return {
        "l1": float(errors["l1"].mean()),
        "l2": l2,
        "psnr": float(errors["psnr"].mean()),
        "psnr_pooled": 10 * math.log10(1.0 / max(l2, 1e-10)),
    }


def summarize(errors: dict[str, list[torch.Tensor]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(torch.cat(v).mean()) for k, v in errors.items()}


@torch.no_grad()
def predict_full(model: ContextEncoder, context: torch.Tensor) -> torch.Tensor:
    """Model output placed on a full-size canvas (a 'center' model predicts only the centre)."""
    pred = model(context)
    if model.output == "full":
        return pred
    lo, hi = central_square(context.shape[-1])
    canvas = context.clone()
    canvas[:, :, lo:hi, lo:hi] = pred
    return canvas


@torch.no_grad()
def inpaint_central(
    model: ContextEncoder,
    images: torch.Tensor,
    hole: torch.Tensor,
    mean: torch.Tensor,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images: uint8 [N, 3, S, S]; hole: [S, S]. Returns (mean-filled input, output with the
    known context kept, ground truth), [N, 3, S, S] in [0, 1] on the CPU."""
    x = to_unit_range(images)
    size = x.shape[-1]
    holes = hole.expand(len(x), 1, size, size)
    context = fill_holes(x, holes, mean)
    pred = predict_full(model, context.to(device)).float().cpu()
    out = torch.where(holes.bool(), pred, x)  # keep the known context, paste the prediction
    truth01, out01, fill01 = (t.add(1).div(2).clamp(0, 1) for t in (x, out, context))
    return fill01, out01, truth01


@torch.no_grad()
def inpainting_grid(
    model: ContextEncoder,
    images: Dataset,
    data_mean: list[float],
    overlap: int,
    rows: int = 8,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], np.ndarray]:
    """The first ``rows`` of ``images`` with central masks: (their Table-1 scores ``l1``, ``l2``,
    ``psnr``; the grid of :func:`save_grid` as uint8 [H, W, 3]). Leaves ``model``'s mode as is."""
    training = model.training
    model.eval()
    hole = torch.from_numpy(central_mask(model.input_size, overlap))
    n = min(rows, len(images))  # type: ignore[arg-type]
    batch = torch.stack([images[i] for i in range(n)])
    mean = torch.tensor(data_mean, dtype=torch.float32)
    columns = inpaint_central(model, batch, hole, mean, device)
    model.train(training)
    scores = summarize({k: [v] for k, v in hole_errors(columns[1], columns[2], hole).items()})
    return scores, grid_array(columns)


@torch.no_grad()
def evaluate_inpainting(
    model: ContextEncoder,
    images: Dataset,
    data_mean: list[float],
    overlap: int,
    max_images: int = 256,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    grid_path: str | Path | None = None,
    grid_rows: int = 8,
) -> dict[str, float]:
    """Central-mask inpainting metrics of ``model`` and of mean-colour fill on ``images``
    (uint8 [3, S, S] items, eval view). Returns {l1, l2, psnr, mean_fill_l1, mean_fill_l2, mean_fill_psnr, n_images}."""
    model.eval()
    size = model.input_size
    hole = torch.from_numpy(central_mask(size, overlap))
    mean = torch.tensor(data_mean, dtype=torch.float32)
    n = min(len(images), max_images)  # type: ignore[arg-type]
    subset = torch.utils.data.Subset(images, range(n))
    ours: dict[str, list[torch.Tensor]] = {"l1": [], "l2": [], "psnr": []}
    fill: dict[str, list[torch.Tensor]] = {"l1": [], "l2": [], "psnr": []}
    grid_batch = None
    for batch in DataLoader(subset, batch_size=batch_size):
        fill01, out01, truth01 = inpaint_central(model, batch, hole, mean, device)
        for key, val in hole_errors(out01, truth01, hole).items():
            ours[key].append(val)
        for key, val in hole_errors(fill01, truth01, hole).items():
            fill[key].append(val)
        if grid_batch is None:
            grid_batch = (fill01[:grid_rows], out01[:grid_rows], truth01[:grid_rows])
    metrics = {**summarize(ours), **summarize(fill, "mean_fill_"), "n_images": float(n)}
    if grid_path is not None and grid_batch is not None:
        save_grid(grid_path, grid_batch)
    return metrics


def label_row(labels: Sequence[str], width: int) -> np.ndarray:
    """A white strip with ``labels`` written in black, one per ``width``-px column (a label too
    long for its column is broken at '_' onto more lines, then cut) -> uint8 [H, n * width, 3]."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(text: str) -> bool:
        return draw.textlength(text, font=font) <= width - 2

    wrapped = []
    for text in labels:
        lines, line = [], ""
        for part in text.replace("_", "_\0").split("\0"):
            if line and not fits(line + part):
                lines.append(line)
                line = ""
            line += part
        lines.append(line)
        for j, ln in enumerate(lines):
            while len(ln) > 1 and not fits(ln):
                ln = ln[:-1]
            lines[j] = ln
        wrapped.append(lines)
    height = 12 * max(len(w) for w in wrapped) + 2
    strip = Image.new("RGB", (width * len(labels), height), "white")
    pen = ImageDraw.Draw(strip)
    for k, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            pen.text((k * width + 1, 12 * j), line, fill="black", font=font)
    return np.asarray(strip)


def save_grid(
    path: str | Path,
    columns: tuple[torch.Tensor, ...],
    pad: int = 2,
    labels: Sequence[str] | None = None,
) -> None:
    """Write a PNG whose rows are images and whose columns are ``columns`` ([N, 3, S, S] in [0, 1]),
    under a row of column ``labels`` drawn in the image when given."""
    grid = grid_array(columns, pad, labels)
    atomic_save(path, lambda fh: Image.fromarray(grid).save(fh, format="PNG"))


def grid_array(
    columns: tuple[torch.Tensor, ...], pad: int = 2, labels: Sequence[str] | None = None
) -> np.ndarray:
    """uint8 [H, W, 3]: one row per image, one cell per column ([N, 3, S, S] in [0, 1]), under a
    row of column ``labels`` when given."""
    if labels is not None and len(labels) != len(columns):
        raise ValueError(f"{len(labels)} labels for {len(columns)} columns")
    rows = []
    for i in range(len(columns[0])):
        cells = [(c[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for c in columns]
        cells = [np.pad(c, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for c in cells]
        rows.append(np.concatenate(cells, axis=1))
    if labels is not None:
        rows.insert(0, label_row(labels, rows[0].shape[1] // len(columns)))
    return np.concatenate(rows, axis=0)
