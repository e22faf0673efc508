"""The pretext data pipeline: images -> (uint8 image, hole mask) batches, resumable by step.

Every random choice of a sample (crop, flip, mask) is a pure function of (seed, step, slot), so a
run restarted from a checkpoint at step t sees exactly the batches an uninterrupted run would,
whatever the number of loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.masks import MaskGenerator

log = logging.getLogger(__name__)


def sample_seed(seed: int, step: int, slot: int) -> int:
    """A 63-bit seed for sample ``slot`` of batch ``step`` (independent streams via SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0] >> 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps ``start_step .. total_steps - 1``, lists of (dataset index, sample seed).

    Epoch e is a seeded permutation of the dataset (last incomplete batch dropped). With
    ``world_size > 1`` each rank takes its contiguous slice of the global batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if n < batch_size:
            raise ValueError(f"dataset has {n} images, fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} not divisible by world size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch_size // self.world_size
        epoch, perm = -1, None
        for step in range(self.start_step, self.total_steps):
            e, pos = divmod(step, self.steps_per_epoch)
            if e != epoch:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + e)
                perm = torch.randperm(self.n, generator=gen).tolist()
                epoch = e
            batch = perm[pos * self.batch_size : (pos + 1) * self.batch_size]
            lo = self.rank * per_rank
            yield [
                (idx, sample_seed(self.seed, step, lo + j))
                for j, idx in enumerate(batch[lo : lo + per_rank])
            ]


class SeededViews(Dataset):
    """Indexed by (index, sample_seed): the base dataset's torch-RNG augmentations (random crop,
    flip) are seeded from ``sample_seed``, so a resumed run sees the same batches. Item: the base
    dataset's item (e.g. (image, labels) for ``method=supervised``)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only, which the augmentations draw from: torch.manual_seed would
            # also queue a seed per CUDA device, slowly (docs/decisions.md, "Pretext samples seeded")
            torch.default_generator.manual_seed(seed)
            return self.images[index]


class MaskedImages(SeededViews):
    """Wraps an image dataset (item: uint8 [3, S, S]) and draws a hole for each sample.

    Indexed by (index, sample_seed) as :class:`SeededViews`; the mask is drawn from
    ``sample_seed`` too. Item: (image uint8 [3, S, S], hole bool [1, S, S]).
    """

    def __init__(self, images: Dataset, masks: MaskGenerator):
        super().__init__(images)
        self.masks = masks

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image = super().__getitem__(key)
        hole = self.masks(np.random.default_rng(key[1]))
        return image, torch.from_numpy(hole)[None]


def make_loader(
    dataset: SeededViews, sampler: StepBatchSampler, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] in 0..255 -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def dataset_mean(images: Dataset, max_images: int = 256) -> list[float]:
    """Per-channel mean in [-1, 1] over (up to) the first ``max_images`` eval-view images."""
    n = min(len(images), max_images)  # type: ignore[arg-type]
    total = torch.zeros(3, dtype=torch.float64)
    for i in range(n):
        total += to_unit_range(images[i][None]).mean(dim=(0, 2, 3)).double()
    return (total / max(n, 1)).tolist()


def fill_holes(images: torch.Tensor, hole: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Context input (1 - M) * x + M * mean. images: [N, 3, S, S]; hole: [N, 1, S, S]; mean: [3]."""
    hole = hole.to(images.dtype)
    return images * (1 - hole) + mean.view(1, 3, 1, 1).to(images) * hole


# The generated data sets, ``data/<name>/VOC2007`` -> their MiniVOC (seed, number of images).
# ``minivoc`` is the transfer set (the stand-in for PASCAL VOC); ``minivoc_pretrain`` the
# pretraining set of every pretext method (the stand-in for ImageNet: the context encoder and the
# autoencoder use its images, ``method=supervised`` also its labels), disjoint from the transfer
# set (every image is drawn from another random state; the background photos are the same few).
BUILTIN_SETS = {"minivoc": (0, 1000), "minivoc_pretrain": (1, 3000)}


def is_builtin_root(root: str | Path) -> bool:
    parts = Path(root).parts[-3:]
    return (
        len(parts) == 3
        and parts[0] == "data"
        and parts[1] in BUILTIN_SETS
        and parts[2] == "VOC2007"
    )


def ensure_builtin(root: str | Path) -> None:
    """Generate a built-in mini-VOC root (its seed and size) when it is missing; else nothing."""
    root = Path(root)
    if not root.exists() and is_builtin_root(root):
        from core import minivoc

        log.info("generating the built-in mini-VOC under %s", root.parent)
        seed, n_images = BUILTIN_SETS[root.parts[-2]]
        minivoc.generate(root.parent, n_images=n_images, seed=seed)
