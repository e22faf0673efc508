"""Resuming a stopped detect / segment run ends where an uninterrupted run ends, bit for bit; a
resume checkpoint is data: one that would run code (or mmengine's own format) is refused."""

import functools
import importlib
import json
import shutil

import pytest
import torch

from core.atomic_io import read_jsonl
from core.checkpoint import read_tensor_file
from core.cli import run_cli
from transfer import mm_run


class Interrupted(Exception):
    pass


def _args(voc_root, ckpt, run_dir):
    return [f"--checkpoint={ckpt}", f"--data={voc_root}", f"run_dir={run_dir}", "max_iters=4",
            "checkpoint_every=2", "batch_size=2", "warmup_iters=1", "threads=1",
            "progress=false"]  # fmt: skip


def without_time(result):
    return json.dumps({k: v for k, v in result.items() if k != "time_s"}, sort_keys=True)


def assert_same(a, b, where="checkpoint"):
    """Equal nested dicts / lists of tensors (bit for bit) and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# mmengine trains on the GPU where there is one, and its atomics (RoIAlign's backward) and cuDNN
# kernels (deterministic=False) are not bit-reproducible from run to run: exactness is a CPU claim
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="bit-exact on the CPU only")


@CPU_ONLY
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_resume_after_a_stop_is_exact(task, voc_root, ckpt, tmp_path, monkeypatch):
    module = importlib.import_module(f"transfer.{task}")
    # a metrics line every iteration, so that the lines after the checkpoint are seen re-logged
    monkeypatch.setattr(mm_run.ProgressHook, "__init__",
                        functools.partialmethod(mm_run.ProgressHook.__init__, every=1))  # fmt: skip

    def run(name):
        return module.main(module.parse_config(_args(voc_root, ckpt, tmp_path / name)))

    straight = run("straight")
    logged = mm_run.ProgressHook.after_train_iter

    def stop_in_iteration_3(self, runner, *args, **kwargs):
        logged(self, runner, *args, **kwargs)
        if runner.iter + 1 == 3:  # trained and logged, after the checkpoint of iteration 2
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(mm_run.ProgressHook, "after_train_iter", stop_in_iteration_3)
        with pytest.raises(Interrupted):
            run("resumed")
    work = tmp_path / "resumed" / "work"
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_2.pth"]
    assert (work / "last_checkpoint").read_text() == str(work / "iter_2.pth")
    assert [r["iter"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3]
    # plain data: torch's restricted unpickler reads it with nothing allow-listed
    assert torch.load(work / "iter_2.pth", weights_only=True)["meta"]["iter"] == 2

    resumed = run("resumed")
    assert without_time(resumed) == without_time(straight)
    a = read_tensor_file(tmp_path / "straight" / "work" / "iter_4.pth")
    b = read_tensor_file(work / "iter_4.pth")
    for key in ("state_dict", "optimizer", "param_schedulers", "rng"):
        assert_same(a[key], b[key], key)
    assert b["meta"]["iter"] == 4
    # the log history of iterations 1-2 came back with the checkpoint: 4 losses, the same ones
    for key in ("train/loss", "train/lr"):
        history = b["message_hub"]["log_scalars"][key]["log_history"]
        assert_same(history, a["message_hub"]["log_scalars"][key]["log_history"], key)
        assert len(history) == 4
    # line 3 of the stopped run was dropped and logged again: the same lines, none twice
    lines, reference = (read_jsonl(tmp_path / name / "metrics.jsonl")
                        for name in ("resumed", "straight"))  # fmt: skip
    assert [r["iter"] for r in lines] == [1, 2, 3, 4, 4]
    assert lines[:4] == reference[:4]
    assert without_time(lines[4]["test"]) == without_time(reference[4]["test"])


class RunsCode:
    """Unpickling this calls exec: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("content", ["code", "mmengine"])
def test_resume_refuses_a_checkpoint_that_is_not_data(content, voc_root, ckpt, tmp_path, capsys):
    from mmengine.logging import HistoryBuffer

    from transfer import detect

    marker = tmp_path / "marker"
    run_dir = tmp_path / "det"
    work = run_dir / "work"
    work.mkdir(parents=True)
    payload = RunsCode(marker) if content == "code" else HistoryBuffer([1.0], [1])
    # as mmengine lays a checkpoint out, with the payload in its message hub
    torch.save({"meta": {"epoch": 0, "iter": 2}, "state_dict": {},
                "message_hub": {"log_scalars": {"train/loss": payload}}}, work / "iter_2.pth")  # fmt: skip
    (work / "last_checkpoint").write_text(str(work / "iter_2.pth"))
    if content == "code":  # the file does run code when unpickled unrestricted
        shutil.copy(work / "iter_2.pth", tmp_path / "copy.pth")
        torch.load(tmp_path / "copy.pth", weights_only=False)
        assert marker.read_text() == "ran"
        marker.unlink()

    with pytest.raises(SystemExit) as exit:
        run_cli(detect.main, detect.parse_config(_args(voc_root, ckpt, run_dir)))
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    called = "exec" if content == "code" else "mmengine.logging.history_buffer.HistoryBuffer"
    assert lines == [
        f"error: {work / 'iter_2.pth'}: refused: unpickling it would call {called}; a checkpoint "
        "may hold only tensors, numbers, strings and dicts / lists of them (it is read as data, "
        f"never run as code); delete {work} to train this run again from iteration 0"
    ]
    assert not marker.exists()
    assert not (run_dir / "result.json").exists()


def test_resume_names_a_missing_checkpoint_in_one_line(voc_root, ckpt, tmp_path, capsys):
    from transfer import detect

    work = tmp_path / "det" / "work"
    work.mkdir(parents=True)
    (work / "last_checkpoint").write_text("/elsewhere/work/iter_8.pth\n")  # a moved run folder
    with pytest.raises(SystemExit) as exit:
        run_cli(detect.main, detect.parse_config(_args(voc_root, ckpt, tmp_path / "det")))
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {work / 'last_checkpoint'}: names iter_8.pth, which does not exist; "
        f"delete {work} to train this run again from iteration 0"
    ]
