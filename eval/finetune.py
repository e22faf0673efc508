"""Semi-supervised fine-tuning on 1 % / 10 % of the labels (Zhai et al. 2019 S4L; SimCLR §B.5; the
fixed ImageNet subsets of ``simclr/imagenet_subsets``): the whole encoder plus a new linear head on
its output, trained end to end on a fixed label subset of train, top-1 / top-5 on val.

The subset of a fraction is drawn once per class (at least one image of each class) from a seed
that depends on the fraction only, so every checkpoint and seed is fine-tuned on the same images;
the stage records their ids. Training: SGD with momentum and a cosine schedule, random-resized-crop
+ flip (the train view of ``core.datasets``), fixed hyperparameters (no choice on val).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.data import to_unit_range
from eval.metrics import topk_accuracy


@dataclass
class FinetuneConfig:
    fractions: tuple[float, ...] = (0.01, 0.1)  # label fractions of train
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4


def label_subset(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted rows: ``fraction`` of each class's rows (at least one), drawn from a seed of the
    fraction alone."""
    rng = np.random.default_rng([round(fraction * 1_000_000), 24])
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rows.extend(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.array(rows, np.int64))


class Finetuned(nn.Module):
    """A copy of the pretext encoder + a linear head on its flattened output: x [N, 3, S, S] in
    [-1, 1] -> logits [N, C]."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.head = nn.Linear(encoder.out_channels * encoder.out_size**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).flatten(1))


def finetune_topk(
    encoder: nn.Module,
    train: Dataset,
    val: Dataset,
    num_classes: int,
    cfg: FinetuneConfig,
    seed: int,
    device: torch.device,
) -> dict[int, float]:
    """Fine-tune on ``train`` ((augmented image, label) items), {k: val top-k} on ``val``."""
    torch.manual_seed(seed)
    net = Finetuned(encoder, num_classes).to(device)
    loader = DataLoader(train, cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs * len(loader)))
    for _ in range(cfg.epochs):
        net.train()
        for images, labels in loader:
            if len(images) < 2 and any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
                continue  # BatchNorm needs two images in train mode
            loss = F.cross_entropy(net(to_unit_range(images).to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    scores, truth = [], []
    with torch.no_grad():
        for images, labels in DataLoader(val, 128):
            scores.append(net(to_unit_range(images).to(device)).float().cpu().numpy())
            truth.append(labels.numpy())
    return topk_accuracy(np.concatenate(scores), np.concatenate(truth))
