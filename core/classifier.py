"""The classification head on a pretrained encoder and the VOC multi-label loss, one of each for
pretext ``method=supervised`` and ``transfer.classify``.

VOC labels are one convention everywhere (``core.datasets.VOCClassification``): ``labels`` [N, C]
1 where the class has a non-difficult object, ``difficult_only`` [N, C] 1 where it has only
difficult ones; the VOC07 protocol leaves those entries out (neither positive nor negative).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """Encoder + new head. x: [N, 3, S, S] in [-1, 1] -> logits [N, C].

    ``kind='mlp'``: pool5 -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 (AlexNet's
    head); ``'linear'``: pool5 -> fc8. PyTorch's default (fan-in scaled) init: Caffe's N(0, 0.01)
    starves the encoder of gradient through two hidden layers (loss stuck at the class prior).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        kind: Literal["mlp", "linear"],
        hidden: int,
        dropout: float,
    ):
        super().__init__()
        self.encoder = encoder
        dim = encoder.out_channels * encoder.out_size**2
        if kind == "mlp":
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(dim, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(dim, num_classes))

    @property
    def new_layers(self) -> list[nn.Linear]:
        """The head's Linear layers (Krähenbühl et al.'s data-dependent init rescales them)."""
        return [m for m in self.head if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def multilabel_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    difficult_only: torch.Tensor,
    count: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """VOC multi-label binary cross-entropy: summed over the entries that are not difficult-only,
    divided by ``count``, by default the number of images (per-image normalisation: Caffe's
    SigmoidCrossEntropyLoss, BVLC/caffe sigmoid_cross_entropy_loss_layer.cpp, normalises by
    BATCH_SIZE unless told otherwise, as the DeCAF-era VOC fine-tuning did).

    logits, labels, difficult_only: [N, C]. ``count``: another normaliser (method=supervised
    passes the number of kept entries of the global batch, the value its runs were made with).
    """
    loss = F.binary_cross_entropy_with_logits(logits, labels, 1.0 - difficult_only, reduction="sum")
    return loss / (len(logits) if count is None else count)
