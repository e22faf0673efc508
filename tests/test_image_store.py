"""The decoded image store: its bytes (oracle: decode + resize by hand), resume after a SIGKILL
mid-build (same bytes as a build in one go, only the missing images decoded again), and the
refusal of a store made from other data or settings (one ``error:`` line, exit 2)."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core import image_store
from core.datasets import VOCImages
from core.image_store import ImageStore, StoreError, StoreImages, StoreSettings, build
from core.images import load_rgb

ROOT = Path(__file__).resolve().parents[1]
SIDE = 32


@pytest.fixture(scope="module")
def store_dir(tiny_voc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "s32"
    return build(tiny_voc, out, StoreSettings("voc", "train", SIDE))


def test_store_holds_every_train_image_decoded_and_resized(tiny_voc, store_dir):
    store = ImageStore(store_dir)
    ref = VOCImages(tiny_voc, "train", SIDE, train=False)
    assert store.ids == ref.ids and len(store) == len(ref.files)
    for i, f in enumerate(ref.files):
        image = load_rgb(f)
        h, w = image.shape[:2]
        k = SIDE / min(h, w)
        assert tuple(store.shapes[i]) == (max(SIDE, round(h * k)), max(SIDE, round(w * k)), 3)
        np.testing.assert_array_equal(store.image(i), image_store.resize_short_side(image, SIDE))
    # eval views from the store are the very pixels of today's eval views (same resize)
    views = StoreImages(store, train=False)
    for i in range(len(store)):
        assert torch.equal(views[i], ref[i])
    assert not list(store_dir.parent.glob(".*partial"))


def test_build_resumes_after_a_kill_with_the_same_bytes(tiny_voc, store_dir, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "core.image_store", "build", str(tiny_voc), str(out),
           "--short-side", str(SIDE), "--chunk-images", "4", "--kill-after", "10"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    part = image_store.partial_dir(out)
    assert not out.exists() and part.is_dir()
    # killed after chunk 3's bytes (12 images) were written, before its records: 8 are committed
    assert (part / "records.bin").stat().st_size == 8 * image_store.RECORD.itemsize
    decoded = []
    real = image_store.load_rgb
    monkeypatch.setattr(image_store, "load_rgb", lambda p, *a: decoded.append(p) or real(p, *a))
    build(tiny_voc, out, StoreSettings("voc", "train", SIDE))
    n = len(ImageStore(store_dir))
    assert len(decoded) == n - 8  # resumed, not restarted
    assert (out / "images.u8").read_bytes() == (store_dir / "images.u8").read_bytes()
    a, b = ImageStore(out), ImageStore(store_dir)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.shapes, b.shapes)
    assert a.ids == b.ids and not part.exists()


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        image_store.run_cli(image_store.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_store_from_other_settings_or_data_is_refused(tiny_voc, store_dir, tmp_path, capsys):
    before = (store_dir / "images.u8").read_bytes()
    err = _cli_error(["build", str(tiny_voc), str(store_dir), "--short-side", "40"], capsys)
    assert "short_side 32, asked 40" in err
    err = _cli_error(
        ["build", str(tiny_voc), str(store_dir), "--short-side", "32", "--split", "val"], capsys
    )
    assert "split 'train', asked 'val'" in err
    assert (store_dir / "images.u8").read_bytes() == before  # nothing already written is lost
    # the same settings: up to date, nothing rebuilt
    build(tiny_voc, store_dir, StoreSettings("voc", "train", SIDE))
    # changed source files: refused when built again and when opened for training
    copy = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc, copy)
    build(copy, tmp_path / "copy_store", StoreSettings("voc", "train", SIDE))
    jpg = copy / "JPEGImages" / f"{ImageStore(store_dir).ids[0]}.jpg"
    os.utime(jpg, ns=(1, 1))
    err = _cli_error(
        ["build", str(copy), str(tmp_path / "copy_store"), "--short-side", "32"], capsys
    )
    assert "source files changed" in err
    with pytest.raises(StoreError, match="changed since the store was built"):
        ImageStore(tmp_path / "copy_store").check(copy, "voc", "train", SIDE)
    store = ImageStore(store_dir)
    with pytest.raises(StoreError, match="root"):
        store.check(copy, "voc", "train", SIDE)
    with pytest.raises(StoreError, match="short_side: store 32, config 64"):
        store.check(tiny_voc, "voc", "train", 64)
    store.check(tiny_voc, "voc", "train", SIDE)  # the matching config passes
    (tmp_path / "link").symlink_to(tiny_voc)
    store.check(tmp_path / "link", "voc", "train", SIDE)  # the same files through a symlink


def test_partial_store_from_other_settings_is_refused(tiny_voc, tmp_path, capsys):
    out = tmp_path / "p"
    part = image_store.partial_dir(out)
    part.mkdir()
    image_store.atomic_write_json(
        part / "meta.json", {"version": 1, "settings": {"short_side": 99}}
    )
    err = _cli_error(["build", str(tiny_voc), str(out), "--short-side", "32"], capsys)
    assert "partial store from other data or settings" in err
    assert (part / "meta.json").exists()
