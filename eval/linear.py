"""Linear probes on frozen features, single-label, as the field trains them (dinov2 ``eval/linear.py``).

One linear classifier per (layer, learning rate), all trained at once on one feature pass per batch
(dinov2's ``AllClassifiers``: the lr sweep as parallel heads): SGD with momentum 0.9, no weight
decay, cosine schedule over all steps, lr scaled by batch / 256 (dinov2), cross-entropy summed over
the heads. Each layer's features go through a BatchNorm without affine parameters before its heads
(VISSL's ``eval_mlp`` head for AlexNet layers, BatchNorm + FC), so one lr list suits every layer.
Heads: N(0, 0.01) weights, zero bias (dinov2 ``LinearClassifier``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LinearConfig:
    epochs: int = 20
    batch_size: int = 256
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)  # per 256 images (dinov2 scaling)
    momentum: float = 0.9
    weight_decay: float = 0.0  # dinov2's linear eval: none
    augment: bool = True  # random-resized-crop + flip on train: an encoder pass per epoch


class LinearHeads(nn.Module):
    """feats {layer: [N, D_layer]} -> {(layer, lr index): logits [N, C]}."""

    def __init__(self, dims: dict[str, int], num_classes: int, lrs: tuple[float, ...]):
        super().__init__()
        self.layers, self.lrs = tuple(dims), tuple(lrs)
        self.norms = nn.ModuleDict({k: nn.BatchNorm1d(d, affine=False) for k, d in dims.items()})
        self.heads = nn.ModuleDict(
            {
                f"{k}_lr{i}": nn.Linear(d, num_classes)
                for k, d in dims.items()
                for i in range(len(lrs))
            }
        )
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
        out = {}
        for layer in self.layers:
            z = self.norms[layer](feats[layer])
            for i in range(len(self.lrs)):
                out[layer, i] = self.heads[f"{layer}_lr{i}"](z)
        return out

    def param_groups(self, scale: float) -> list[dict]:
        return [
            {"params": list(self.heads[f"{layer}_lr{i}"].parameters()), "lr": lr * scale}
            for layer in self.layers
            for i, lr in enumerate(self.lrs)
        ]


def train_heads(
    heads: LinearHeads,
    epoch_batches: Callable[[int], Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]],
    steps_per_epoch: int,
    cfg: LinearConfig,
) -> list[float]:
    """Train every head on ``epoch_batches(epoch)`` -> (feats, labels int [B]) for ``cfg.epochs``
    epochs; returns the mean summed loss of each epoch."""
    opt = torch.optim.SGD(
        heads.param_groups(cfg.batch_size / 256),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs * steps_per_epoch))
    losses = []
    for epoch in range(cfg.epochs):
        heads.train()
        total, count = 0.0, 0
        for feats, labels in epoch_batches(epoch):
            logits = heads(feats)
            loss = sum(F.cross_entropy(v, labels) for v in logits.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total, count = total + loss.item() * len(labels), count + len(labels)
        losses.append(total / max(1, count))
    return losses


@torch.no_grad()
def head_scores(
    heads: LinearHeads, feats: dict[str, np.ndarray], batch_size: int = 1024
) -> dict[tuple[str, int], np.ndarray]:
    """{(layer, lr index): logits [N, C]} of fixed features (eval mode: BatchNorm's running stats)."""
    heads.eval()
    n = len(next(iter(feats.values())))
    parts: dict[tuple[str, int], list[np.ndarray]] = {}
    for i in range(0, n, batch_size):
        batch = {k: torch.from_numpy(v[i : i + batch_size]) for k, v in feats.items()}
        for key, logits in heads(batch).items():
            parts.setdefault(key, []).append(logits.numpy())
    return {key: np.concatenate(v) for key, v in parts.items()}


def fixed_batches(
    feats: dict[str, np.ndarray], labels: np.ndarray, batch_size: int, seed: int
) -> Callable[[int], Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]]:
    """Shuffled batches of precomputed features (no augmentation); the order depends on (seed,
    epoch) only."""
    tensors = {k: torch.from_numpy(v) for k, v in feats.items()}
    y = torch.from_numpy(np.asarray(labels, np.int64))

    def batches(epoch: int):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(y), batch_size):
            rows = order[i : i + batch_size]
            if len(rows) > 1 or len(y) == 1:  # BatchNorm needs two rows in train mode
                yield {k: v[rows] for k, v in tensors.items()}, y[rows]

    return batches
