"""``method=relative_location``: predicting the relative position of two patches (Doersch, Gupta &
Efros, "Unsupervised Visual Representation Learning by Context Prediction", ICCV 2015; reference
code cdoersch/deepcontext ``train.py``).

Batch transform (§3, §4): a 3x3 grid of ``patch`` x ``patch`` cells with ``gap`` px between them,
each patch moved by up to ``jitter`` px on each axis; the centre patch and one of its 8 neighbours,
label = the neighbour's position (``NEIGHBOURS``: 0 1 2 / 3 _ 4 / 5 6 7, deepcontext's ``pos2lbl``).
Guards against trivial cues (§4 "Avoiding trivial solutions"): the gap and the jitter (boundary
patterns, lines continuing between patches); against chromatic aberration, ``chroma=drop`` (the
released code's choice: keep one random colour channel, replace the other two by noise, std 1/100 of
the kept one's, as §4 says) or ``chroma=project`` (§4: remove the green-magenta axis, a = [-1, 2,
-1]); and, as the released ``prep_image``, a third of the patches downsampled to as little as
~100/9216 of their pixels and upsampled back (pixelation), then each patch normalised to a fixed
RMS contrast (mean 0).

Network (§3.1, Fig. 3; ``gen_net``): both patches through the same encoder (siamese, shared
weights), fc6 per patch (BN + ReLU), concatenated, fc7 (BN + ReLU), fc8 (ReLU), fc9: 8 logits;
8-way cross-entropy. The encoder runs at the patch's own size (it is fully convolutional: a 32-px
patch gives the small64 encoder's pool5 2x2), so it stays the module and state-dict keys every
transfer protocol reads at 64 px. Evaluation: 8-way accuracy on the val split, all 8 neighbours of
each image, with fixed draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.config import ConfigError
from core.data import SeededViews
from core.models import ContextEncoder
from pretext.methods.base import EncoderHead, build_images, eval_picks
from pretext.methods.classification import ClassificationMethod, accuracy, final_loss

# (dy, dx) of the neighbour relative to the centre patch, in label order (reading order).
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# deepcontext's prep_image: RMS 50 on the 0-255 scale (AlexNet's input contrast), here in [-1, 1]
PATCH_RMS = 50 / 127.5
# the green-magenta colour axis of §4's projection
GREEN_MAGENTA = np.array([-1.0, 2.0, -1.0])
EVAL_STREAM = 2015  # the val draws: the same pairs for every seed


@dataclass
class RelativeLocationConfig:
    """method=relative_location: patch geometry, trivial-cue guards and head width. Defaults: the
    paper's 96 / 48 / 7 px at a third of the scale, for the small64 encoder."""

    patch: int = 32  # patch side, px (the paper's 96)
    gap: int = 16  # px between neighbouring cells (the paper's 48: half a patch)
    jitter: int = 2  # max shift of each patch per axis, px (the paper's 7, x 1/3)
    chroma: Literal["drop", "project", "none"] = "drop"
    downsample_prob: float = 0.33  # share of patches pixelated (released prep_image: 1/3)
    hidden: int = 512  # fc6 / fc7 / fc8 width (the paper's 4096, scaled as supervised.yaml's 512)


def image_size(c: RelativeLocationConfig) -> int:
    """Side of the view the grid is cut from: 3 patches, 2 gaps and the jitter margin."""
    return 3 * c.patch + 2 * c.gap + 2 * c.jitter


def cell_origin(row: int, col: int, c: RelativeLocationConfig) -> tuple[int, int]:
    """(top, left) of grid cell (row, col) before jitter; cells 0..2 per axis."""
    step = c.patch + c.gap
    return c.jitter + row * step, c.jitter + col * step


def pair_boxes(
    label: int, shifts: np.ndarray, c: RelativeLocationConfig
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(top, left) of the centre patch and of neighbour ``label``; ``shifts``: int [2, 2], the
    (dy, dx) jitter of each, in [-jitter, jitter]."""
    dy, dx = NEIGHBOURS[label]
    (t0, l0), (t1, l1) = cell_origin(1, 1, c), cell_origin(1 + dy, 1 + dx, c)
    return (t0 + int(shifts[0, 0]), l0 + int(shifts[0, 1])), (
        t1 + int(shifts[1, 0]),
        l1 + int(shifts[1, 1]),
    )


def pixelate(patch: np.ndarray, side: int) -> np.ndarray:
    """uint8 [P, P, 3] -> downsampled to side x side and back (bilinear)."""
    p = patch.shape[0]
    small = Image.fromarray(patch).resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((p, p), Image.Resampling.BILINEAR))


def prepare_patch(
    patch: np.ndarray, rng: np.random.Generator, c: RelativeLocationConfig
) -> np.ndarray:
    """uint8 [P, P, 3] -> float32 [3, P, P]: maybe pixelated, colour guard, mean 0, RMS PATCH_RMS.
    Every draw is made whether used or not, so the stream of a sample does not depend on them."""
    p = c.patch
    low = max(1, round(10 * p / 96))  # the released code's 10 px of 96
    pixelated = rng.random() < c.downsample_prob
    side = int(np.sqrt(rng.random() * ((p - 1) ** 2 - low**2) + low**2))
    keep = int(rng.integers(3))
    noise = rng.standard_normal((3, p, p))
    if pixelated:
        patch = pixelate(patch, side)
    x = patch.astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0  # [3, P, P] in [-1, 1]
    x = x - x.mean(axis=(1, 2), keepdims=True)
    if c.chroma == "drop":
        kept = x[keep]
        x = noise * (kept.std() / 100)
        x[keep] = kept
    elif c.chroma == "project":
        a = GREEN_MAGENTA / np.linalg.norm(GREEN_MAGENTA)
        x = x - a[:, None, None] * np.tensordot(a, x, axes=1)[None]
    rms = np.sqrt(np.mean(x**2))
    return (x * (PATCH_RMS / max(rms, 1e-8))).astype(np.float32)


def cut_pair(
    image: torch.Tensor, label: int, rng: np.random.Generator, c: RelativeLocationConfig
) -> torch.Tensor:
    """uint8 [3, S, S] (S = :func:`image_size`) -> float32 [2, 3, P, P]: centre, neighbour."""
    shifts = rng.integers(-c.jitter, c.jitter + 1, size=(2, 2))
    hwc = image.permute(1, 2, 0).numpy()
    p = c.patch
    patches = [
        prepare_patch(np.ascontiguousarray(hwc[top : top + p, left : left + p]), rng, c)
        for top, left in pair_boxes(label, shifts, c)
    ]
    return torch.from_numpy(np.stack(patches))


class PatchPairs(SeededViews):
    """Indexed by (index, sample_seed): a pair from the train view, the neighbour drawn uniformly.
    Item: (float32 [2, 3, P, P], int64 label)."""

    def __init__(self, images, c: RelativeLocationConfig):
        super().__init__(images)
        self.c = c

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image = super().__getitem__(key)
        rng = np.random.default_rng(key[1])
        label = int(rng.integers(len(NEIGHBOURS)))
        return cut_pair(image, label, rng, self.c), torch.tensor(label)


class PairHead(nn.Module):
    """pool5 of 2N patches (centre, neighbour, centre, ...) [2N, C, n, n] -> logits [N, 8]."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc6 = nn.Sequential(
            nn.Flatten(), nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)
        )
        self.fc7 = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)
        )
        self.fc8 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.fc9 = nn.Linear(hidden, len(NEIGHBOURS))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        per_patch = self.fc6(feats)
        pairs = per_patch.view(-1, 2 * per_patch.shape[1])  # [N, 2h]: centre | neighbour
        return self.fc9(self.fc8(self.fc7(pairs)))


class RelativeLocationMethod(ClassificationMethod):
    """Context prediction over the suite's encoder (siamese, at the patch's size)."""

    def __init__(self, cfg: Any, model: ContextEncoder):
        super().__init__(cfg, model)
        c, enc = cfg.relloc, model.encoder
        with torch.no_grad():  # the encoder's pool5 on one patch (no RNG drawn)
            feats = enc(torch.zeros(1, 3, c.patch, c.patch))
        if feats.numel() == 0:
            raise ConfigError(f"relloc.patch={c.patch}: too small for model.arch={cfg.model.arch}")
        self.head = PairHead(feats[0].numel(), c.hidden)
        self.encoder_head = EncoderHead(enc, self.head)

    @classmethod
    def resolve_config(cls, cfg: Any) -> Any:
        c = cfg.relloc
        if c.patch < 8 or c.jitter < 0 or c.gap < 2 * c.jitter:
            raise ConfigError(
                f"relloc: patch={c.patch}, gap={c.gap}, jitter={c.jitter}: need patch >= 8, "
                "jitter >= 0 and gap >= 2 * jitter (jittered patches never touch)"
            )
        if not 0.0 <= c.downsample_prob <= 1.0:
            raise ConfigError(f"relloc.downsample_prob={c.downsample_prob}: not in [0, 1]")
        return super().resolve_config(cfg)

    def open_train_images(self):
        cfg = self.cfg
        return build_images(cfg, cfg.data.split, train=True, image_size=image_size(cfg.relloc))

    def items(self) -> PatchPairs:
        return PatchPairs(self.train_images, self.cfg.relloc)

    def evaluate(
        self, run_dir: Path, device: torch.device, mean: list[float], progress: dict[str, float]
    ) -> dict[str, Any]:
        """8-way accuracy over all 8 neighbours of up to ``eval_images`` val images (eval view)."""
        cfg, c = self.cfg, self.cfg.relloc
        images = build_images(cfg, cfg.data.val_split, False, image_size(c))
        picks = eval_picks(len(images), cfg.eval_images)

        def pairs_of(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            image = images[i]
            cuts = [
                cut_pair(image, k, np.random.default_rng([EVAL_STREAM, i, k]), c)
                for k in range(len(NEIGHBOURS))
            ]
            return torch.stack(cuts), torch.arange(len(NEIGHBOURS))

        batches = (
            [pairs_of(int(i)) for i in picks[lo : lo + 16]] for lo in range(0, len(picks), 16)
        )
        stacked = ((torch.cat([x for x, _ in b]), torch.cat([y for _, y in b])) for b in batches)
        acc = accuracy(self.encoder_head, stacked, device)
        return {"val_relloc_acc": acc, **progress, **final_loss(run_dir)}
