"""kill -9 a pretext run at random moments and inside checkpoint writes; restarted, it ends with the
weights, losses and metrics of an uninterrupted run."""

import json
import random
import re
import time

import torch

from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint

STEPS = 40
# 'write': killed with half of the checkpoint's bytes in the temp file; 'replace': killed with the
# complete temp file not yet renamed over last.pt; 'early': a random moment of the start-up (data
# scan, model, resume); 'random': a random moment 1-3 steps after the checkpoint it resumed from.
PLAN = ["early", "write", "random", "replace", "random", "early", "write", "random", "replace",
        "random", "random", "write", "early", "random", "replace", "random"]  # fmt: skip
RESULT_KEYS = ("final_loss_rec", "inpaint_l1", "inpaint_l2", "inpaint_psnr", "steps")


def logged_step(run_dir) -> int:
    records = read_jsonl(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


def temp_files(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))


def test_kill9_at_random_moments_and_inside_checkpoint_writes(
    fork_server, pretext_args, tmp_path, waiter
):
    straight = tmp_path / "straight"
    t0 = time.monotonic()
    pid, log = fork_server.start("pretext.train", pretext_args(straight, STEPS))
    assert fork_server.wait(pid) == 0, log.read_text()
    duration = time.monotonic() - t0
    print(f"uninterrupted run: {duration:.1f} s")

    def reach_kill_point(mode, pid, log, run, last_step, fraction, ahead):
        if mode in ("write", "replace"):
            waiter(lambda: marker.exists() or not fork_server.running(pid), 60, "the paused write")
            if marker.exists():
                held = json.loads(marker.read_text())
                assert held["phase"] == mode and temp_files(run), "the kill lands mid-write"
        elif mode == "early":
            time.sleep(0.6 * fraction)
        else:
            # metrics.jsonl may hold steps of the killed process until this one resumes from last.pt
            def trained_to(step):
                resumed = last_step < 0 or (log.exists() and "resuming" in log.read_text())
                return resumed and logged_step(run) >= step

            target = max(last_step, 0) + ahead
            waiter(lambda: trained_to(target) or not fork_server.running(pid), 60, f"step {target}")
            time.sleep(fraction * duration / STEPS)

    run = tmp_path / "killed"
    args = pretext_args(run, STEPS)
    ckpt = run / "checkpoints" / "last.pt"
    marker = tmp_path / "marker"
    rng = random.Random(0)
    kills, last_step, expected_resume = [], -1, []
    for mode in PLAN:
        marker.unlink(missing_ok=True)
        pause = None
        if mode in ("write", "replace"):  # hold inside the 2nd checkpoint write of this process
            pause = {"save": 2, "phase": mode, "marker": str(marker)}
        pid, log = fork_server.start("pretext.train", args, pause)
        expected_resume.append((log, last_step))
        reach_kill_point(mode, pid, log, run, last_step, rng.uniform(0, 1), rng.randint(1, 3))
        rc = fork_server.kill(pid)
        print(f"{mode:8s} killed at {time.monotonic() - t0:.1f} s, rc {rc}")
        if rc == 0:  # finished before the kill: nothing left to interrupt
            break
        assert rc == -9, log.read_text()
        kills.append(mode)
        # what a kill leaves is always a loadable checkpoint, never behind the previous one
        if ckpt.exists():
            state = load_checkpoint(ckpt)
            assert state["step"] >= last_step
            last_step = state["step"]
    pid, log = fork_server.start("pretext.train", args)
    expected_resume.append((log, last_step))
    assert fork_server.wait(pid) == 0, log.read_text()

    assert len(kills) >= 10 and set(PLAN) <= set(kills), kills
    # every restart that got as far as loading resumed from the checkpoint the previous kill left
    resumed = 0
    for log, step in expected_resume:
        found = re.findall(r"resuming .* from step (\d+)", log.read_text())
        assert found in ([], [str(step)]), (found, step)
        resumed += bool(found)
    assert resumed >= len(kills) // 2, resumed
    a, b = load_checkpoint(straight), load_checkpoint(run)
    assert a["step"] == b["step"] == STEPS
    for part in ("model",):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    opt_a, opt_b = a["optimizers"]["gen"]["state"], b["optimizers"]["gen"]["state"]
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[k][name], opt_b[k][name]), (k, name)
    # the log holds each step once, with the uninterrupted run's losses
    ref = {r["step"]: r["loss_rec"] for r in read_jsonl(straight / "metrics.jsonl")}
    got = [(r["step"], r["loss_rec"]) for r in read_jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert dict(got) == ref
    res_a = json.loads((straight / "result.json").read_text())
    res_b = json.loads((run / "result.json").read_text())
    assert {k: res_a[k] for k in RESULT_KEYS} == {k: res_b[k] for k in RESULT_KEYS}
    assert temp_files(run) == [], "temp files of killed writes are cleaned up"
