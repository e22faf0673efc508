"""What the pretext methods that classify their own labels share (rotation, relative location):
the cross-entropy step over encoder + head, top-1 accuracy on val batches, and the method base
whose trained module is ``encoder_head``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.atomic_io import read_jsonl
from core.data import to_unit_range
from pretext import distributed
from pretext.methods.base import EncoderHead, Method, Placement


@dataclass
class ClassificationStep:
    """One step of encoder + head on images with one int64 label each: cross-entropy.

    ``flatten``: fold a leading per-item axis into the batch (an item of k views -> k samples)."""

    net: nn.Module
    opt: torch.optim.Optimizer
    placement: Placement
    poison: bool = False  # testing aid (fail_at_step): a NaN input

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """images: [N, k, 3, P, P] (uint8, or float in [-1, 1]); labels: int64 [N, k] or [N]."""
        p = placement = self.placement
        x = images.to(p.device, non_blocking=True).flatten(0, images.dim() - 4)
        x = to_unit_range(x) if x.dtype == torch.uint8 else x.float()
        x = x.contiguous(memory_format=placement.memory_format)
        if self.poison:
            x = x * float("nan")
        labels = labels.to(p.device, non_blocking=True).flatten()
        with p.autocast():
            logits = self.net(x)
        # DDP: every rank has as many samples, so the mean of the ranks' means is the global mean
        loss = F.cross_entropy(logits.float(), labels)
        world = distributed.world_size()
        shown = distributed.all_reduce_sum(loss.detach() / world)
        out = {"loss": float(shown)}
        if not math.isfinite(out["loss"]):
            return out
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        acc = (logits.detach().argmax(1) == labels).float().mean() / world
        out["train_acc"] = float(distributed.all_reduce_sum(acc))
        return out


@torch.no_grad()
def accuracy(net: nn.Module, batches, device: torch.device) -> float:
    """Top-1 accuracy of ``net`` over (images [N, k, 3, P, P], labels [N, k]) batches, eval mode."""
    net.eval()
    correct = total = 0
    for images, labels in batches:
        x = images.to(device).flatten(0, images.dim() - 4)
        x = to_unit_range(x) if x.dtype == torch.uint8 else x.float()
        pred = net(x).argmax(1).cpu()
        correct += int((pred == labels.flatten()).sum())
        total += labels.numel()
    net.train()
    return correct / max(total, 1)


def final_loss(run_dir: Path) -> dict[str, float]:
    last = read_jsonl(run_dir / "metrics.jsonl")
    return {"final_loss": last[-1]["loss"]} if last else {}


class ClassificationMethod(Method):
    """A method that trains ``encoder_head`` (set by the subclass) with :class:`ClassificationStep`
    on items of (views, int64 labels)."""

    encoder_head: EncoderHead

    @property
    def net(self) -> nn.Module:
        return self.encoder_head

    def make_step(
        self,
        net: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer | None,
        mean: torch.Tensor,
        placement: Placement,
    ) -> ClassificationStep:
        return ClassificationStep(net, opt_g, placement)
