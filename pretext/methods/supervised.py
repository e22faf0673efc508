"""``method=supervised``: the encoder pretrained with labels, the upper bound of Table 2 (the paper's
"ImageNet" row, §5.2: AlexNet trained for ImageNet classification, then transferred).

The same encoder (``model.arch``) gets a classification head on pool5 and is trained on a labelled
set disjoint from the transfer data; the checkpoint holds the whole context-encoder network (its
bottleneck and decoder untrained, as for ``random_init``) so every transfer and eval stage loads it
unchanged, plus the head (``head``) and ``class_names``.

Batch transform: (uint8 image, label target[, difficult_only]), the labelled set's train view.
Head: :class:`core.classifier.Classifier`'s fc6-fc7-fc8 on pool5. Loss: (binary) cross-entropy.
Evaluation: val and train mAP / top-1.

Labels:

- a VOC-format root: multi-label targets from the XML objects, binary cross-entropy per class; an
  image that holds a class only as difficult objects leaves that entry out (``difficult_only``,
  core.datasets.VOCClassification), as the VOC07 protocol does. Metric: VOC07 11-point mAP (the transfer protocol's).
- an image folder ``<root>/<class>/...`` (ImageNet ``train/<wnid>/*.JPEG``): one label per image,
  the position of its class subfolder among the sorted subfolder names; cross-entropy. Metric:
  top-1 accuracy.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import voc
from core.atomic_io import read_jsonl
from core.classifier import Classifier, multilabel_bce
from core.data import SeededViews, to_unit_range
from core.datasets import ImageFolderClasses, VOCClassification, no_class_subfolders
from core.models import ContextEncoder
from core.splits import split_folder
from core.stage_inputs import Input
from pretext import distributed
from pretext.methods.base import Method, Placement, build_images, check_data

log = logging.getLogger(__name__)


def check_labelled_data(d: Any) -> None:
    """What :func:`build_images` (``labels=True``) opens for the train and val splits, checked without listing
    the images: the splits (:func:`check_data`), then a VOC root's class list or a class
    subfolder in each split folder; ``d``: the ``data`` section."""
    check_data(d, (d.split, d.val_split))
    if d.format == "voc":
        voc.class_names(d.root)
        return
    for split in (d.split, d.val_split):
        folder = split_folder(d.root, split)
        with os.scandir(folder) as entries:
            if not any(e.is_dir() and not e.name.startswith(".") for e in entries):
                raise no_class_subfolders(folder)


def classification_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    difficult_only: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 target [N]: cross-entropy; float labels [N, C] with ``difficult_only`` [N, C]:
    :func:`core.classifier.multilabel_bce` averaged over the entries that are not difficult-only
    (this method's runs were made so; transfer.classify divides by the images). ``count``: the
    number of terms to divide by in place of this batch's (:func:`loss_term_count`; under DDP the
    global batch's)."""
    if target.dtype == torch.int64:
        if count is None:
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, reduction="sum") / count.clamp(min=1)
    count = loss_term_count(target, difficult_only) if count is None else count
    return multilabel_bce(logits, target, difficult_only, count.clamp(min=1))


def loss_term_count(
    target: torch.Tensor, difficult_only: torch.Tensor | None = None
) -> torch.Tensor:
    """The normaliser of :func:`classification_loss`: images, or entries not difficult-only."""
    if target.dtype == torch.int64:
        return torch.tensor(float(len(target)), device=target.device)
    return (difficult_only == 0).float().sum()


def batch_accuracy(
    logits: torch.Tensor, target: torch.Tensor, difficult_only: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-1 accuracy (single-label) or the share of correct non-ignored entries (multi-label)."""
    if target.dtype == torch.int64:
        return (logits.argmax(1) == target).float().mean()
    keep = difficult_only == 0
    correct = ((logits > 0) == (target > 0)) & keep
    return correct.sum() / keep.sum().clamp(min=1)


@dataclass
class SupervisedStep:
    """One optimisation step of the classifier (the supervised counterpart of InpaintingStep)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format
    poison: bool = False  # testing aid (fail_at_step): a NaN input

    def __call__(
        self, images: torch.Tensor, target: torch.Tensor, difficult: torch.Tensor | None = None
    ) -> dict[str, float]:
        """images: uint8 [N, 3, S, S]; target: int64 [N], or float labels [N, C] with
        ``difficult`` (difficult_only [N, C])."""
        x = to_unit_range(images.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=self.memory_format)
        if self.poison:
            x = x * float("nan")
        target = target.to(self.device, non_blocking=True)
        if difficult is not None:
            difficult = difficult.to(self.device, non_blocking=True)
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled):
            logits = self.model(x)
        # DDP: this rank's share of the global-batch loss (see InpaintingStep), backward world x share
        world = distributed.world_size()
        terms = loss_term_count(target, difficult)
        count = distributed.all_reduce_sum(terms) if world > 1 else None
        loss = classification_loss(logits.float(), target, difficult, count)
        shown = distributed.all_reduce_sum(loss.detach().clone())
        out = {"loss": float(shown), "loss_cls": float(shown)}
        if not math.isfinite(out["loss"]):
            return out
        self.opt.zero_grad(set_to_none=True)
        (loss * world if world > 1 else loss).backward()
        self.opt.step()
        acc = (
            batch_accuracy(logits.detach().float(), target, difficult) / world
        )  # mean over the ranks
        out["train_acc"] = float(distributed.all_reduce_sum(acc))
        return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: VOCClassification | ImageFolderClasses,
    device: torch.device,
    max_images: int,
    prefix: str,
    batch_size: int = 64,
) -> dict[str, float]:
    """``{prefix}_mAP`` (VOC07 11-point, multi-label) or ``{prefix}_top1`` (single-label) on up to
    ``max_images`` eval-view images spread evenly over the set (0: all). A metric that is
    undefined (no positives) is left out, so result.json has no NaN."""
    n = len(images)
    m = n if max_images <= 0 else min(n, max_images)
    picks = np.unique(np.linspace(0, n - 1, m).round().astype(int))
    model.eval()
    scores, targets = [], []
    for lo in range(0, len(picks), batch_size):
        columns = list(zip(*(images[int(i)] for i in picks[lo : lo + batch_size])))
        x = to_unit_range(torch.stack(columns[0]).to(device))
        scores.append(model(x).float().cpu())
        targets.append([torch.stack(column) for column in columns[1:]])  # target[, difficult]
    model.train()
    logits = torch.cat(scores)
    target, *difficult = (torch.cat(column) for column in zip(*targets))
    if not images.multi_label:
        return {f"{prefix}_top1": float((logits.argmax(1) == target).float().mean())}
    # the transfer protocol's AP (a plain numpy/sklearn module; imported here only)
    from core.voc_ap import mean_ap, voc07_classification_ap

    per_class = voc07_classification_ap(logits.numpy(), target.numpy(), difficult[0].numpy())
    value = mean_ap(per_class)
    if not math.isfinite(value):
        log.warning("%s mAP undefined: no class has a positive among %d images", prefix, len(picks))
        return {}
    return {f"{prefix}_mAP": value}


@dataclass
class HeadConfig:
    """method=supervised: the classifier trained on pool5 with the encoder, AlexNet's fc6-fc7-fc8
    (``mlp``: Linear-ReLU-Dropout twice, then Linear) or one Linear (``linear``)."""

    kind: Literal["mlp", "linear"] = "mlp"
    hidden: int = 4096  # fc6 / fc7 width (AlexNet's)
    dropout: float = 0.5


class SupervisedMethod(Method):
    """The encoder + :class:`Classifier` trained with the pretraining set's labels."""

    def __init__(self, cfg: Any, model: ContextEncoder):
        super().__init__(cfg, model)
        names = self.train_images.class_names
        self.val_images = build_images(cfg, cfg.data.val_split, False, self.input_size, True, names)
        h = cfg.head
        self.classifier = Classifier(model.encoder, len(names), h.kind, h.hidden, h.dropout)
        self.head = self.classifier.head

    @classmethod
    def input_checks(cls, cfg: Any) -> list[Input]:
        """The labelled train and val splits."""
        return [Input("data.root", cfg.data.root, lambda: check_labelled_data(cfg.data))]

    def open_train_images(self) -> VOCClassification | ImageFolderClasses:
        return build_images(self.cfg, self.cfg.data.split, True, self.input_size, labels=True)

    @property
    def net(self) -> nn.Module:
        return self.classifier

    def extra_state(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "class_names": list(self.train_images.class_names)}

    def items(self) -> SeededViews:
        return SeededViews(self.train_images)

    def make_step(
        self,
        net: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer | None,
        mean: torch.Tensor,
        placement: Placement,
    ) -> SupervisedStep:
        p = placement
        return SupervisedStep(net, opt_g, p.device, p.autocast_dtype, p.memory_format)

    def evaluate(
        self, run_dir: Path, device: torch.device, mean: list[float], progress: dict[str, float]
    ) -> dict[str, Any]:
        """val (and train, eval views) mAP or top-1 on up to ``eval_images`` images; no inpainting
        evaluation (the decoder is untrained)."""
        cfg, names = self.cfg, self.train_images.class_names
        train_eval = build_images(cfg, cfg.data.split, False, self.input_size, True, names)
        result = {
            **evaluate(self.classifier, self.val_images, device, cfg.eval_images, "val"),
            **evaluate(self.classifier, train_eval, device, cfg.eval_images, "train"),
            **progress,
            "num_classes": float(len(self.train_images.class_names)),
        }
        last = read_jsonl(run_dir / "metrics.jsonl")
        if last:
            result["final_loss"] = last[-1]["loss"]
        return result
