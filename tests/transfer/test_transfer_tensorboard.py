"""TensorBoard event files of transfer runs, read back with TensorBoard's reader (core.tb): a
fine-tuning's curves and test mAP; a detection run's losses and test metrics, each iteration once
after a resume."""

import functools

import pytest

from core import tb
from core.atomic_io import read_jsonl
from transfer import classify, mm_run
from transfer.mm_tensorboard import TensorboardHook


def test_finetune_events_hold_its_curve_and_test_map(voc_root, ckpt, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"--checkpoint={ckpt}", f"--data={voc_root}", f"run_dir={run_dir}",
            "modes=[finetune,linear_pool5]", "finetune.epochs=2", "finetune.batch_size=4",
            "linear.max_iter=10", "threads=1", "progress=false"]  # fmt: skip
    result = classify.main(classify.parse_config(args))
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "epoch" in r]
    scalars = tb.read_scalars(run_dir)
    for key in ("loss", "lr"):
        want = [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in epochs]
        assert scalars[f"finetune/{key}"] == want, key
    assert scalars["test/finetune_mAP"] == [(2, pytest.approx(result["finetune_mAP"], rel=1e-6))]
    assert scalars["test/linear_pool5_mAP"] == [(0, pytest.approx(result["linear_pool5_mAP"]))]
    # recomputed (force=true) the run logs afresh: its events too, each epoch once
    classify.main(classify.parse_config([*args, "force=true"]))
    again = tb.read_scalars(run_dir)
    assert set(again) == set(scalars)
    assert [s for s, _ in again["finetune/loss"]] == [1, 2]
    # off: no event files
    off = tmp_path / "off"
    classify.main(classify.parse_config([*args[:2], f"run_dir={off}", *args[3:],
                                         "log.tensorboard=false"]))  # fmt: skip
    assert tb.event_files(off) == []


class Interrupted(Exception):
    pass


def test_detect_events_after_a_resume(voc_root, ckpt, tmp_path, monkeypatch):
    from transfer import detect

    run_dir = tmp_path / "det"
    args = [f"--checkpoint={ckpt}", f"--data={voc_root}", f"run_dir={run_dir}", "max_iters=4",
            "checkpoint_every=2", "batch_size=2", "warmup_iters=1", "threads=1",
            "progress=false"]  # fmt: skip
    for hook in (mm_run.ProgressHook, TensorboardHook):  # a line / an event every iteration
        monkeypatch.setattr(hook, "__init__", functools.partialmethod(hook.__init__, every=1))
    logged = TensorboardHook.after_train_iter

    def stop_in_iteration_3(self, runner, *a, **k):
        logged(self, runner, *a, **k)
        if runner.iter + 1 == 3:  # written, after the checkpoint of iteration 2
            self.events.flush()
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(TensorboardHook, "after_train_iter", stop_in_iteration_3)
        with pytest.raises(Interrupted):
            detect.main(detect.parse_config(args))
    assert [s for s, _ in tb.read_scalars(run_dir)["train/loss"]] == [1, 2, 3]
    detect.main(detect.parse_config(args))
    scalars = tb.read_scalars(run_dir)
    lines = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in lines if "test" not in r]
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lr"):
        assert scalars[f"train/{key}"] == [(r["iter"], pytest.approx(r[key], rel=1e-6))
                                           for r in train], key  # fmt: skip
    test = {k: v for k, v in scalars.items() if k.startswith("test/")}
    assert "test/pascal_voc/mAP" in test
    assert all(len(v) == 1 and v[0][0] == 4 for v in test.values())
    # recomputed on the finished folder: the test metrics are not written twice
    detect.main(detect.parse_config([*args, "force=true"]))
    again = tb.read_scalars(run_dir)
    assert {k: [s for s, _ in v] for k, v in again.items()} == {
        k: [s for s, _ in v] for k, v in scalars.items()
    }
