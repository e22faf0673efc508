"""kill -9 a classification transfer run at random moments; restarted, it ends with the result and
log of an uninterrupted run, and no kill leaves a half-written file behind."""

import json
import random
import time

import torch

from core.atomic_io import read_jsonl
from core.checkpoint import save_checkpoint
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
