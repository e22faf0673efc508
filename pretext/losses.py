"""Losses of §3.2: masked L2 reconstruction (Eq. 1), adversarial (Eq. 2), joint (Eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_weights(
    hole: torch.Tensor, overlap: int = 4, overlap_weight: float = 10.0
) -> torch.Tensor:
    """Per-pixel weights of the reconstruction loss.

    hole: [N, 1, H, W] (1 = removed). Returns [N, 1, H, W]: 1 inside the hole, ``overlap_weight``
    in the band of ``overlap`` px of known context around it (the paper's 10x-weighted overlap,
    which makes predictions blend with their context), 0 elsewhere. With no hole at all (the
    autoencoder baseline) every pixel gets weight 1: the whole image is reconstructed.
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


def masked_l2_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1: || w * (x - F((1 - M) * x)) ||^2, normalised by the number of hole pixels.

    pred, target: [N, C, H, W]; weights: [N, 1, H, W] from :func:`reconstruction_weights`.
    Returns sum(w * (pred - target)^2) / (C * #{w == 1 pixels}), i.e. the mean squared error per
    hole value, with the overlap band counting ``overlap_weight`` times.
    """
    sq = (pred.float() - target.float()).pow(2) * weights
    count = (weights == 1).sum().clamp_min(1) * pred.shape[1]
    return sq.sum() / count


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
