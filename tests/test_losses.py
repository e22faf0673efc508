"""Loss weights on hand-made tensors (§3.2)."""

import pytest
import torch

from pretext.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    hole_pixel_count,
    joint_loss,
    masked_l2_loss,
    reconstruction_weights,
)
from pretext.train import parse_config


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
    assert masked_l2_loss(pred, target, w, hole).item() == pytest.approx(14 / 4)


def test_masked_l2_ignores_far_context():
    hole = torch.zeros(1, 1, 9, 9)
    hole[..., 4, 4] = 1
    w = reconstruction_weights(hole, overlap=1)
    pred = torch.zeros(1, 3, 9, 9)
    pred[..., 0, 0] = 100.0  # far from the hole: weight 0
    assert masked_l2_loss(pred, torch.zeros_like(pred), w, hole).item() == 0.0


def test_joint_loss_weights_and_adversarial_terms():
    assert joint_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(
        0.999 * 2 + 0.001 * 3
    )
    big = torch.tensor([20.0])
    assert generator_adversarial_loss(big).item() < 1e-6  # D fooled: no generator loss
    assert discriminator_loss(big, -big).item() < 1e-6  # D right on both: no loss
    assert discriminator_loss(-big, big).item() > 10


def test_default_weights_are_eq1_hole_only():
    """Eq. 1: without an overlap band, visible pixels -- even next to the hole -- weigh nothing."""
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 3:5, 3:5] = 1
    w = reconstruction_weights(hole)[0, 0]
    assert torch.equal(w, hole[0, 0])
    pred = torch.zeros(1, 3, 8, 8)
    pred[..., 2, 2] = 5.0  # visible pixel right beside the hole
    assert masked_l2_loss(pred, torch.zeros_like(pred), reconstruction_weights(hole), hole) == 0


def test_normaliser_counts_hole_pixels_whatever_the_band_weight():
    """The old normaliser counted ``weights == 1``: with overlap_weight=1 it counted band pixels
    as hole pixels. The count now comes from the hole mask."""
    hole = torch.zeros(1, 1, 6, 6)
    hole[..., 2:4, 2:4] = 1  # 4 hole pixels, band of 1 px: 12 pixels
    pred, target = torch.ones(1, 1, 6, 6), torch.zeros(1, 1, 6, 6)
    for band_weight in (1.0, 10.0, 0.5):
        w = reconstruction_weights(hole, overlap=1, overlap_weight=band_weight)
        assert masked_l2_loss(pred, target, w, hole).item() == pytest.approx(
            (4 + 12 * band_weight) / 4
        )


def test_hole_pixel_count_mixes_holes_and_whole_images():
    hole = torch.zeros(2, 1, 4, 4)
    hole[0, :, :2, :] = 1  # 8 pixels; image 1 has no hole: all its 16 pixels are reconstructed
    assert hole_pixel_count(hole).item() == 8 + 16


@pytest.mark.parametrize(
    ("kind", "band"),
    [("random_region", "off"), ("random_block", "off"), ("central", "on")],
)
def test_overlap_band_on_for_central_only_and_recorded(kind, band):
    """§3.2 vs §4: the band is the central network's; feature learning uses Eq. 1. The resolved
    choice is what config.yaml records."""
    cfg = parse_config(["--config", "pretext/configs/builtin.yaml", f"mask.kind={kind}"])
    assert cfg.mask.overlap_loss == band
    forced = parse_config([f"mask.kind={kind}", "mask.overlap_loss=on"])
    assert forced.mask.overlap_loss == "on"


def test_run_folder_from_before_the_eq1_fix_is_not_taken_for_an_eq1_run(tmp_path):
    """A config.yaml without mask.overlap_loss was trained with the band on every mask kind: a
    random-region run folder of that time must not resume (or count as finished) as Eq. 1."""
    import yaml

    from core.config import ConfigError, to_dict
    from pretext.train import open_run_folder

    cfg = parse_config(["--config", "pretext/configs/builtin.yaml", f"run_dir={tmp_path}"])
    old = to_dict(cfg)
    del old["mask"]["overlap_loss"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "checkpoints").mkdir()  # a run of that time that trained (a folder holding no
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")  # output may restart: run_folder)
    with pytest.raises(ConfigError, match="mask.overlap_loss: 'on' -> 'off'"):
        open_run_folder(tmp_path, cfg)
    band = parse_config(["--config", "pretext/configs/builtin.yaml", f"run_dir={tmp_path}",
                         "mask.overlap_loss=on"])  # fmt: skip
    assert open_run_folder(tmp_path, band) is None  # the same training: resumes (not finished)
