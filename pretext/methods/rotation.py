"""``method=rotation``: predicting image rotations (Gidaris, Singh & Komodakis, ICLR 2018, "RotNet";
reference code gidariss/FeatureLearningRotNet).

Batch transform (§3, ``dataloader.py``): each image of the batch in its four rotations, 0, 90, 180
and 270 degrees counter-clockwise (label k: ``torch.rot90(x, k)``, the reference's ``rotate_img``),
all four in the same batch. Head (``architectures/AlexNet.py``, the ImageNet AlexNet variant): on
pool5, two fully connected layers with BatchNorm and ReLU, then a linear 4-way classifier. Loss:
4-way cross-entropy averaged over the 4N images. Evaluation: rotation accuracy on the val split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.data import SeededViews
from core.models import ContextEncoder
from pretext.methods.base import EncoderHead, build_images, eval_picks
from pretext.methods.classification import ClassificationMethod, accuracy, final_loss

ROTATIONS = 4


@dataclass
class RotationConfig:
    """method=rotation: the head on pool5 (RotNet's AlexNet: 4096-4096-4, each fc with BN + ReLU)."""

    hidden: int = 512  # fc width (RotNet AlexNet's 4096, scaled as supervised.yaml's 512 head)


def rotations(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, S, S] -> ([4, 3, S, S] the image turned k * 90 degrees counter-clockwise, labels [0..3])."""
    turned = torch.stack([torch.rot90(image, k, dims=(-2, -1)) for k in range(ROTATIONS)])
    return turned, torch.arange(ROTATIONS)


class RotatedImages(SeededViews):
    """Indexed by (index, sample_seed): the train view's four rotations.
    Item: (uint8 [4, 3, S, S], int64 [4] labels)."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return rotations(super().__getitem__(key))


def rotation_head(in_dim: int, hidden: int) -> nn.Sequential:
    """pool5 -> fc (no bias) -> BN -> ReLU -> fc -> BN -> ReLU -> 4 logits (RotNet's AlexNet)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, ROTATIONS),
    )


class RotationMethod(ClassificationMethod):
    """RotNet over the suite's encoder: 4-way rotation classification of every image."""

    def __init__(self, cfg: Any, model: ContextEncoder):
        super().__init__(cfg, model)
        enc = model.encoder
        self.head = rotation_head(enc.out_channels * enc.out_size**2, cfg.rotation.hidden)
        self.encoder_head = EncoderHead(enc, self.head)

    batches_from_store = True

    def items(self) -> RotatedImages:
        return RotatedImages(self.train_images)

    def store_batch(self, images: torch.Tensor, hole: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """RotatedImages' batch made on the whole batch: [N, 3, S, S] -> (the 4 rotations
        [N, 4, 3, S, S], labels [N, 4]); ``hole`` (none: mask.kind=none) is dropped."""
        turned, labels = rotations(images)  # rot90 over the last two axes: [4, N, 3, S, S]
        return turned.transpose(0, 1), labels.to(images.device).expand(len(images), -1)

    def evaluate(
        self, run_dir: Path, device: torch.device, mean: list[float], progress: dict[str, float]
    ) -> dict[str, Any]:
        """Rotation accuracy over the 4 rotations of up to ``eval_images`` val images (eval view)."""
        cfg = self.cfg
        images = build_images(cfg, cfg.data.val_split, False, self.input_size)
        picks = eval_picks(len(images), cfg.eval_images)
        batches = (
            [rotations(images[int(i)]) for i in picks[lo : lo + 64]]
            for lo in range(0, len(picks), 64)
        )
        stacked = (
            (torch.stack([x for x, _ in b]), torch.stack([y for _, y in b])) for b in batches
        )
        acc = accuracy(self.encoder_head, stacked, device)
        return {"val_rotation_acc": acc, **progress, **final_loss(run_dir)}
