"""kill -9 a classification, detection or segmentation transfer run at random moments (and inside
a checkpoint write); restarted, it ends with the result and log of an uninterrupted run (detect /
segment: and its weights), and no kill leaves a half-written file behind."""

import json
import random
import time
from pathlib import Path

import pytest
import torch

from core.atomic_io import read_jsonl
from core.checkpoint import read_tensor_file, save_checkpoint
from core.models import build_model

KILLS = 8


def write_checkpoint(path):
    torch.manual_seed(3)
    model = build_model("small64")
    save_checkpoint(path, {
        "method": "context_encoder", "arch": "small64", "output": "full", "dropout": 0.0,
        "model": model.state_dict(), "discriminator": None, "optimizers": {}, "step": 0,
        "rng": {}, "data_mean": [0.0, 0.0, 0.0], "config": {}, "elapsed_s": 0.0,
    })  # fmt: skip
    return path


def without_times(result):
    return {k: v for k, v in result.items() if not k.endswith("time_s")}


def test_kill9_classification_transfer(fork_server, tiny_voc, tmp_path, waiter):
    ckpt = write_checkpoint(tmp_path / "ce.pt")

    def args(run_dir):
        return [f"--checkpoint={ckpt}", f"--data={tiny_voc}", f"run_dir={run_dir}",
                "modes=[finetune,linear_pool5,linear_fc]", "finetune.epochs=3", "finetune.batch_size=4",
                "linear.max_iter=10", "threads=1", "progress=false"]  # fmt: skip

    pid, log = fork_server.start("transfer.classify", args(tmp_path / "straight"))
    assert fork_server.wait(pid) == 0, log.read_text()
    reference = json.loads((tmp_path / "straight" / "result.json").read_text())

    run = tmp_path / "killed"
    rng = random.Random(1)
    killed = 0
    # kill points: during start-up, or a random moment after the k-th line of this process's log
    # (k = 0: data loaded; 1-3: fine-tuning epochs; 4: fine-tuning scored, probe running)
    for lines in [-1, 2, 0, 4, 1, 3, -1, 4][:KILLS]:
        pid, log = fork_server.start("transfer.classify", args(run))

        def reached(lines=lines, pid=pid, log=log):
            started = log.exists() and " test images" in log.read_text()
            done = not fork_server.running(pid)
            return done or (started and len(read_jsonl(run / "metrics.jsonl")) >= lines)

        if lines >= 0:
            waiter(reached, 60, f"{lines} log lines")
        # a random moment early in the next phase: the last phases (a fine-tuning epoch, the
        # probes) take only 0.1-0.3 s here, and a run that finishes first is not a kill
        time.sleep(rng.uniform(0.0, 0.05))
        rc = fork_server.kill(pid)
        assert rc in (0, -9), log.read_text()
        killed += rc == -9
        # whatever a kill leaves is complete: no temp file, every JSON file parses
        assert sorted(p.name for p in run.glob(".*")) == []
        for name in ("meta.json", "result.json"):
            if (run / name).exists():
                json.loads((run / name).read_text())
        if (run / "result.json").exists():
            assert without_times(json.loads((run / "result.json").read_text())) == without_times(
                reference
            )
            break
    assert killed >= 6
    pid, log = fork_server.start("transfer.classify", args(run))
    assert fork_server.wait(pid) == 0, log.read_text()
    result = json.loads((run / "result.json").read_text())
    assert without_times(result) == without_times(reference)
    assert read_jsonl(run / "metrics.jsonl") == read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert json.loads((run / "meta.json").read_text())["status"] == "done"
    # finished: started again, it returns the recorded result without recomputing
    mtime = (run / "result.json").stat().st_mtime_ns
    pid, log = fork_server.start("transfer.classify", args(run))
    assert fork_server.wait(pid) == 0 and "is finished" in log.read_text()
    assert (run / "result.json").stat().st_mtime_ns == mtime


MM_ITERS = 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="bit-exact on the CPU only (GPU atomics)")
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_kill9_mm_transfer_resumes_exactly(task, fork_server, tiny_voc, tmp_path, waiter):
    ckpt = write_checkpoint(tmp_path / "ce.pt")
    module = f"transfer.{task}"

    def args(run_dir):
        return [f"--checkpoint={ckpt}", f"--data={tiny_voc}", f"run_dir={run_dir}",
                f"max_iters={MM_ITERS}", "checkpoint_every=2", "batch_size=2", "warmup_iters=1",
                "threads=1", "progress=false"]  # fmt: skip

    pid, log = fork_server.start(module, args(tmp_path / "straight"))
    assert fork_server.wait(pid, 300) == 0, log.read_text()
    reference = json.loads((tmp_path / "straight" / "result.json").read_text())

    run = tmp_path / "killed"
    work = run / "work"
    marker = tmp_path / "marker"
    rng = random.Random(2)
    # start-up; inside the 2nd checkpoint write (half the bytes written), and before the rename of
    # the 1st (complete temp file); a random moment after the checkpoint of iteration 4
    for mode in ["early", "write", "replace", "after_iter_4"]:
        marker.unlink(missing_ok=True)
        pause = None
        if mode in ("write", "replace"):
            save = 2 if mode == "write" else 1
            pause = {"save": save, "phase": mode, "marker": str(marker)}
        pid, log = fork_server.start(module, args(run), pause)
        if mode == "early":
            time.sleep(rng.uniform(0.0, 1.0))
        elif mode == "after_iter_4":
            waiter(lambda pid=pid: (work / "iter_4.pth").exists() or not fork_server.running(pid),
                   120, "iteration 4")  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            waiter(lambda pid=pid: marker.exists() or not fork_server.running(pid), 120, mode)
            assert marker.exists(), log.read_text()
            assert list(work.glob(".iter_*.pth.*.tmp")), "the kill lands mid-write"
        rc = fork_server.kill(pid)
        assert rc == -9 or (rc == 0 and mode == "after_iter_4"), log.read_text()  # 0: it finished
        # whatever a kill leaves, last_checkpoint names a complete checkpoint
        if (work / "last_checkpoint").exists():
            named = work / Path((work / "last_checkpoint").read_text()).name
            assert read_tensor_file(named)["meta"]["iter"] in (2, 4, 6)
    pid, log = fork_server.start(module, args(run))
    assert fork_server.wait(pid, 300) == 0, log.read_text()
    assert rc == 0 or "resumed epoch: 0, iter: " in log.read_text()
    result = json.loads((run / "result.json").read_text())

    def numbers(result):  # as text: NaN (AP of a class without objects) equals NaN
        return json.dumps(without_times(result), sort_keys=True)

    assert numbers(result) == numbers(reference)
    final, straight = (read_tensor_file(d / "work" / f"iter_{MM_ITERS}.pth")
                       for d in (run, tmp_path / "straight"))  # fmt: skip
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key
    lines, reference_lines = (read_jsonl(d / "metrics.jsonl") for d in (run, tmp_path / "straight"))
    assert [numbers(r.pop("test")) for r in (lines[-1], reference_lines[-1])] == [
        numbers(reference)
    ] * 2
    assert lines == reference_lines
    assert sorted(p.name for p in work.glob("*.pth")) == [f"iter_{MM_ITERS}.pth"]
    assert list(work.glob(".*.tmp")) == []
    assert json.loads((run / "meta.json").read_text())["status"] == "done"
