"""Loss weights on hand-made tensors (§3.2)."""

import pytest
import torch

from pretext.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    joint_loss,
    masked_l2_loss,
    reconstruction_weights,
)


def test_weights_hole_one_band_ten_rest_zero():
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 3:5, 3:5] = 1
    w = reconstruction_weights(hole, overlap=1, overlap_weight=10.0)[0, 0]
    assert torch.all(w[3:5, 3:5] == 1)
    band = torch.zeros(8, 8, dtype=torch.bool)
    band[2:6, 2:6] = True
    band[3:5, 3:5] = False
    assert torch.all(w[band] == 10) and band.sum() == 12
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert torch.all(w[outside] == 0)


def test_no_hole_means_whole_image_reconstruction():
    w = reconstruction_weights(torch.zeros(2, 1, 4, 4), overlap=2)
    assert torch.all(w == 1)


def test_masked_l2_value_by_hand():
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., 1:3, 1:3] = 1  # 4 hole pixels
    w = reconstruction_weights(hole, overlap=1, overlap_weight=10.0)
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.zeros(1, 1, 4, 4)
    pred[..., 1, 1] = 2.0  # hole pixel: error 4, weight 1
    pred[..., 0, 0] = 1.0  # band pixel: error 1, weight 10
    # (4 * 1 + 1 * 10) / (4 hole pixels * 1 channel)
    assert masked_l2_loss(pred, target, w).item() == pytest.approx(14 / 4)


def test_masked_l2_ignores_far_context():
    hole = torch.zeros(1, 1, 9, 9)
    hole[..., 4, 4] = 1
    w = reconstruction_weights(hole, overlap=1)
    pred = torch.zeros(1, 3, 9, 9)
    pred[..., 0, 0] = 100.0  # far from the hole: weight 0
    assert masked_l2_loss(pred, torch.zeros_like(pred), w).item() == 0.0


def test_joint_loss_weights_and_adversarial_terms():
    assert joint_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(
        0.999 * 2 + 0.001 * 3
    )
    big = torch.tensor([20.0])
    assert generator_adversarial_loss(big).item() < 1e-6  # D fooled: no generator loss
    assert discriminator_loss(big, -big).item() < 1e-6  # D right on both: no loss
    assert discriminator_loss(-big, big).item() > 10
