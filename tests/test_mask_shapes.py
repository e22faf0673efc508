"""Where random-region silhouettes come from (§3.3): VOC SegmentationObject of data.root or of
mask.shapes_root (the paper: VOC2012), else the built-in blobs, said in the log and result.json."""

import logging
import shutil
import subprocess
import sys

import pytest

from core import voc
from core.config import ConfigError
from pretext.methods.context_encoder import region_shapes
from pretext.train import main, parse_config


@pytest.fixture(scope="module")
def photo_folder(tiny_voc, tmp_path_factory):
    """A flat folder of the mini-VOC's photos: no segmentation masks anywhere."""
    out = tmp_path_factory.mktemp("photos")
    for photo in sorted((tiny_voc / "JPEGImages").glob("*.jpg")):
        shutil.copy(photo, out / photo.name)
    return out


def folder_args(photo_folder, tmp_path):
    return [
        "data.format=folder", f"data.root={photo_folder}", f"run_dir={tmp_path / 'run'}",
        "data.num_workers=0", "optim.batch_size=4", "optim.steps=2", "optim.warmup_steps=0",
        "eval_images=4", "threads=1",
    ]  # fmt: skip


def test_folder_data_with_shapes_root_uses_the_voc_silhouettes(photo_folder, tiny_voc, tmp_path):
    expected = len(voc.object_shapes(tiny_voc))
    cfg = parse_config([*folder_args(photo_folder, tmp_path), f"mask.shapes_root={tiny_voc}"])
    shapes, source = region_shapes(cfg)
    assert len(shapes) == expected > 0
    assert source == f"voc:{tiny_voc} ({expected} shapes)"
    result = main(cfg)
    assert result["mask_shapes_source"] == source


def test_shapes_root_wins_over_the_data_root_and_builtin_is_a_stated_fallback(
    photo_folder, tiny_voc, tmp_path, caplog
):
    cfg = parse_config([*folder_args(photo_folder, tmp_path), "mask.shapes=builtin"])
    assert region_shapes(cfg)[1] == "builtin blobs (64)"
    cfg = parse_config([*folder_args(photo_folder, tmp_path)])  # auto, no VOC anywhere
    with caplog.at_level(logging.INFO, logger="pretext.train"):
        result = main(cfg)
    assert result["mask_shapes_source"] == "builtin blobs (64)"
    assert "falling back to the built-in blobs" in caplog.text
    # a VOC data root is used as before; central masks need no shapes
    assert region_shapes(parse_config([f"data.root={tiny_voc}"]))[1].startswith(f"voc:{tiny_voc}")
    assert region_shapes(parse_config(["mask.kind=central"])) == ([], "none")


def test_voc_shapes_without_a_voc_root_is_an_error_naming_the_key(photo_folder, tmp_path):
    cfg = parse_config([*folder_args(photo_folder, tmp_path), "mask.shapes=voc"])
    with pytest.raises(
        ConfigError, match=r"mask.shapes=voc: .* set mask.shapes_root=<VOC2012 root>"
    ):
        region_shapes(cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "pretext.train", *folder_args(photo_folder, tmp_path),
         "mask.shapes=voc"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: mask.shapes=voc"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_folder_from_before_shapes_root_existed_still_counts_as_finished(
    photo_folder, tmp_path
):
    args = [*folder_args(photo_folder, tmp_path), "mask.shapes=builtin"]
    first = main(parse_config(args))
    config = tmp_path / "run" / "config.yaml"
    config.write_text(
        "".join(ln for ln in config.read_text().splitlines(True) if "shapes_root" not in ln)
    )
    assert main(parse_config(args)) == first
