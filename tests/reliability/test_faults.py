"""Disk full while writing a checkpoint, an infinite loss, the permissions of atomically written files.

The NaN-loss stop (message names the step, last good checkpoint intact) and exact resume are in
tests/test_train.py; here the same stop for +inf, which a ``loss > limit`` check would miss.
"""

import errno
import json
import os
import stat

import pytest
import torch

import core.checkpoint
from core.atomic_io import atomic_write_json
from core.checkpoint import load_checkpoint
from pretext.train import main, parse_config


def run(args):
    return main(parse_config(args))


class FullDisk:
    """A file object that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.fh.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def fail_checkpoint_write(monkeypatch, nth: int, where: str) -> None:
    """Make the ``nth`` checkpoint write of this process fail with ENOSPC at ``where``."""
    real_save, real_fsync, calls = core.checkpoint.atomic_save, os.fsync, [0]

    def failing_save(path, writer):
        calls[0] += 1
        if calls[0] != nth:
            return real_save(path, writer)
        if where == "write":  # half-way through the bytes
            return real_save(path, lambda fh: writer(FullDisk(fh, 4_000_000)))

        def fsync_fails(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync_fails)
        try:
            return real_save(path, writer)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr(core.checkpoint, "atomic_save", failing_save)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    pretext_args, tmp_path, monkeypatch, where
):
    args = pretext_args(tmp_path / "run", 6)
    fail_checkpoint_write(monkeypatch, nth=3, where=where)  # saves: step 0, 2, 4 <- fails
    with pytest.raises(OSError) as err:
        run(args)
    assert err.value.errno == errno.ENOSPC
    if where == "write":  # not torch's "unexpected pos" RuntimeError
        assert "last.pt: cannot write checkpoint (No space left on device)" in str(err.value)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 2  # the previous one, loadable
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]  # no temp file left
    monkeypatch.undo()
    assert run(args)["steps"] == 6  # space freed: it resumes and finishes


def test_infinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    pretext_args, tmp_path, monkeypatch
):
    from pretext.methods import context_encoder

    real, calls = context_encoder.masked_l2_loss, [0]

    def loss_inf_at_call_5(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("inf") if calls[0] == 5 else loss

    monkeypatch.setattr(context_encoder, "masked_l2_loss", loss_inf_at_call_5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss inf at step 4.*\(step 4\)"):
        run(pretext_args(tmp_path / "run", 8))
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    # mkstemp alone makes 0600 files: results and checkpoints unreadable to a shared group
    with open(tmp_path / "plain.json", "w") as fh:
        json.dump({}, fh)
    atomic_write_json(tmp_path / "atomic.json", {})
    mode = stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
