"""TensorBoard event files (core.tb) of pretext runs, read back with TensorBoard's own reader:
they hold what metrics.jsonl holds, change no number of the run, and survive a resume."""

import io
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core import tb
from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint
from pretext.train import main, parse_config

TIMINGS = {"train/images_per_s", "train/train_time_s"}  # wall-clock values differ between runs


def untimed(record):
    return {k: v for k, v in record.items() if k not in ("images_per_s", "train_time_s")}


def run(args):
    return main(parse_config(args))


def moved(args, old, new):
    return [a.replace(str(old), str(new)) for a in args]


def images(run_dir, tag):
    """[(step, uint8 [H, W, 3])] of an image tag, as written (no purging)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0}, purge_orphaned_data=False)
    acc.Reload()
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
            for e in acc.Images(tag)]  # fmt: skip


def test_pretext_events_hold_the_metrics_and_change_no_number(tiny_train_args, tmp_path):
    args = [*tiny_train_args, "log.images_every=4"]
    result = run(args)
    run_dir = tmp_path / "run"
    records = read_jsonl(run_dir / "metrics.jsonl")
    scalars = tb.read_scalars(run_dir)
    for key in ("loss", "loss_rec", "lr"):  # every metrics.jsonl line, as float32
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]
        assert scalars[f"train/{key}"] == expected, key
    assert [s for s, _ in scalars["val/grid_psnr"]] == [4, 8, 12]
    grids = images(run_dir, "val/inpainting_grid")
    assert [s for s, _ in grids] == [4, 8, 12]
    # the last grid is the network the final evaluation drew: its inpainting_grid.png (to one
    # grey level: the evaluation's batch of 32 rounds differently from the grid's 8)
    final = np.asarray(Image.open(run_dir / "inpainting_grid.png").convert("RGB"))
    assert grids[-1][1].shape == final.shape
    assert np.abs(grids[-1][1].astype(int) - final.astype(int)).max() <= 1
    assert not np.array_equal(grids[0][1], grids[-1][1])  # the network changed in between

    # the same run without TensorBoard: no event file, the same weights, losses and result
    off = tmp_path / "off"
    result_off = run([*moved(args, tmp_path / "run", off), "log.tensorboard=false"])
    assert tb.event_files(off) == []
    a, b = (load_checkpoint(d)["model"] for d in (run_dir, off))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [untimed(r) for r in records] == [untimed(r) for r in read_jsonl(off / "metrics.jsonl")]
    assert untimed(result) == untimed(result_off)


def test_resumed_pretext_run_writes_each_step_once(tiny_train_args, tmp_path):
    args = [*tiny_train_args, "log.images_every=4"]
    straight = tmp_path / "straight"
    run(moved(args, tmp_path / "run", straight))
    with pytest.raises(FloatingPointError):  # checkpoint at 4; steps 5-6 logged, then lost
        run([*args, "fail_at_step=6"])
    run_dir = tmp_path / "run"
    assert [s for s, _ in tb.read_scalars(run_dir)["train/loss"]] == [2, 4, 6]
    run(args)
    got, want = tb.read_scalars(run_dir), tb.read_scalars(straight)
    assert set(got) == set(want)
    for tag in set(want) - TIMINGS:  # resumed exactly: the same values, each step once
        assert got[tag] == want[tag], tag
    for tag in TIMINGS:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]]
    assert [s for s, _ in images(run_dir, "val/inpainting_grid")] == [4, 8, 12]
    # the events before the checkpoint, merged into the file that sorts first, then the new one
    names = [p.name for p in tb.event_files(run_dir)]
    assert len(names) == 2 and names[0] == tb.RESUMED
    # TensorBoard's own view (with its purging of restarted steps) is the same
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == got["train/loss"]


def write(run_dir, first_step, steps, value, drop_tags=()):
    events = tb.EventLog(run_dir, first_step=first_step, drop_tags=drop_tags)
    for step in steps:
        events.scalars(step, {"loss": value * step, "name": "text", "flag": True})
    events.close()


def test_events_after_the_resumed_step_are_dropped_and_a_broken_merge_repaired(tmp_path):
    write(tmp_path, 1, range(1, 11), 1.0)
    write(tmp_path, 6, range(6, 9), 10.0)  # resumed at step 5
    expected = [(s, 1.0 * s) for s in range(1, 6)] + [(s, 10.0 * s) for s in range(6, 9)]
    assert tb.read_scalars(tmp_path) == {"loss": expected}  # numbers only, each step once
    # a merge killed after writing the merged file, before removing the one it read
    leftover = tb.event_files(tmp_path)[-1]
    shutil.copy(tmp_path / tb.RESUMED, leftover.with_name(leftover.name + "x"))
    write(tmp_path, 8, range(8, 10), 100.0)
    expected = expected[:7] + [(8, 800.0), (9, 900.0)]
    assert tb.read_scalars(tmp_path) == {"loss": expected}
    assert len(tb.event_files(tmp_path)) == 2


def test_dropped_tags_and_a_fresh_start(tmp_path):
    events = tb.EventLog(tmp_path, first_step=1)
    events.scalars(4, {"loss": 1.0}, "train/")
    events.scalars(4, {"mAP": 0.5}, "test/")
    events.close()
    tb.EventLog(tmp_path, first_step=5, drop_tags=("test/",)).close()
    assert tb.read_scalars(tmp_path) == {"train/loss": [(4, 1.0)]}
    tb.EventLog(tmp_path, first_step=0).close()  # a run that starts afresh
    assert tb.read_scalars(tmp_path) == {}


def test_disabled_or_without_the_package_writes_nothing(tmp_path, monkeypatch, caplog):
    events = tb.EventLog(tmp_path / "off", enabled=False)
    events.scalars(1, {"loss": 1.0})
    events.close()
    assert not (tmp_path / "off").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    events = tb.EventLog(tmp_path / "missing")
    assert not events.enabled
    events.scalars(1, {"loss": 1.0})
    events.image("grid", np.zeros((4, 4, 3), np.uint8), 1)
    events.close()
    assert not (tmp_path / "missing").exists()
    assert "tensorboard package is not installed" in caplog.text


def test_a_logdir_shows_one_run_per_run_folder(tmp_path):
    """``tensorboard --logdir runs/builtin``: every run folder below is one run, resumed or not."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    folders = ["pretext/context_encoder/seed0", "transfer/classify/context_encoder/seed0"]
    for name in folders:
        write(tmp_path / name, 1, range(1, 5), 1.0)
    write(tmp_path / folders[0], 3, range(3, 6), 2.0)  # resumed: two files, one run
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    runs.Reload()
    assert sorted(runs.Runs()) == folders
    steps = [e.step for e in runs.Tensors(folders[0], "loss")]
    assert steps == [1, 2, 3, 4, 5]
