"""Losses of §3.2: masked L2 reconstruction (Eq. 1), adversarial (Eq. 2), joint (Eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_weights(
    hole: torch.Tensor, overlap: int = 0, overlap_weight: float = 10.0
) -> torch.Tensor:
    """Per-pixel weights of the reconstruction loss.

    hole: [N, 1, H, W] (1 = removed). Returns [N, 1, H, W]: 1 inside the hole, 0 elsewhere --
    Eq. 1 of the paper, ``||M * (x - F((1 - M) * x))||^2``, the loss of feature learning (§3.2).
    With ``overlap > 0`` a band of ``overlap`` px of *known* context around the hole gets
    ``overlap_weight``: the device of the central inpainting network (§4; 4 px, 10x in the released
    ``train.lua``), which makes its predictions blend with their context. The trainer turns the band
    on for central masks only (``mask.overlap_loss``). With no hole at all (the autoencoder
    baseline) every pixel gets weight 1: the whole image is reconstructed.
    """
    hole = hole.float()
    if overlap > 0:
        grown = F.max_pool2d(hole, 2 * overlap + 1, stride=1, padding=overlap)
        weights = hole + overlap_weight * (grown - hole)
    else:
        weights = hole.clone()
    empty = hole.flatten(1).sum(1) == 0
    if empty.any():
        weights[empty] = 1.0
    return weights


def hole_pixel_count(hole: torch.Tensor) -> torch.Tensor:
    """Number of reconstructed pixels in a batch: the hole's pixels, or every pixel of an image
    with no hole (the autoencoder). hole: [N, 1, H, W]. Independent of the loss weights."""
    per_image = hole.flatten(1).float().sum(1)
    return torch.where(per_image > 0, per_image, float(hole[0].numel())).sum()


def masked_l2_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    hole: torch.Tensor,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1: || w * (x - F((1 - M) * x)) ||^2, normalised by the number of hole values.

    pred, target: [N, C, H, W]; weights: [N, 1, H, W] from :func:`reconstruction_weights`; hole:
    [N, 1, H, W] (1 = removed). Returns sum(w * (pred - target)^2) / (C * #hole pixels), i.e. the
    mean squared error per hole value, with an overlap band (if any) counting ``overlap_weight``
    times. The normaliser comes from ``hole``, never from the weights' values.

    ``count``: the number of hole values to divide by, in place of this batch's -- under DDP the
    global batch's (:func:`hole_value_count` summed over the ranks), so that each rank's loss is its
    share of the global-batch loss: hole sizes differ between ranks, and a mean of per-rank means
    is not the global mean.
    """
    sq = (pred.float() - target.float()).pow(2) * weights
    if count is None:
        count = hole_value_count(hole, pred.shape[1])
    return sq.sum() / count.clamp_min(1)


def hole_value_count(hole: torch.Tensor, channels: int) -> torch.Tensor:
    """The normaliser of :func:`masked_l2_loss`: hole pixels x channels (float scalar)."""
    return hole_pixel_count(hole) * channels


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2, generator side (non-saturating): -log D(F((1 - M) * x))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2, discriminator side: -log D(x) - log(1 - D(F((1 - M) * x)))."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def joint_loss(
    rec: torch.Tensor, adv: torch.Tensor, lambda_rec: float = 0.999, lambda_adv: float = 0.001
) -> torch.Tensor:
    """Eq. 3: L = lambda_rec * L_rec + lambda_adv * L_adv."""
    return lambda_rec * rec + lambda_adv * adv
