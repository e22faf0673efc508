"""Sweeps on a real single-node SLURM cluster (tests/slurm/conftest.py starts it)."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import fake_stage
import pytest
from sweep_specs import two_stage_spec, wait_settled, write_sweep

from slurm.sweep import collect_results, load_records, records_path, submit

pytestmark = pytest.mark.slurm


def test_two_by_two_sweep_completes_in_dependency_order(slurm_cluster, tmp_path):
    sweep = write_sweep(
        tmp_path, two_stage_spec("grid", {"mask.kind": ["central", "random"], "seed": [0, 1]})
    )
    runs = tmp_path / "runs"
    out = io.StringIO()
    groups = submit(sweep, "slurm", runs, out=out)
    assert [(g.stage.name, len(g.jobs)) for g in groups] == [("pretext", 4)] + [("classify", 1)] * 4
    array_id = groups[0].jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in groups[0].jobs] == [f"{array_id}_{i}" for i in range(4)]
    for i in range(4):
        assert f"dependency afterok:{array_id}_{i}:" in out.getvalue()

    statuses = wait_settled(sweep, runs, timeout_s=120)
    assert {s.state for s in statuses.values()} == {"done"}, statuses
    # With accounting (slurmdbd), sacct reports the exact final state of every job.
    assert {s.scheduler_state for s in statuses.values()} == {"COMPLETED"}
    rows = collect_results(sweep, runs)
    assert len(rows) == 8
    for row in rows:
        steps = 4 if row["stage"] == "pretext" else 2
        assert row["final_value"] == fake_stage.expected_value(row["seed"], steps)
    for cell in statuses:
        if cell[0] == "classify":
            pre = runs / "grid" / "pretext" / cell[1]
            extra = json.loads((runs / "grid" / "classify" / cell[1] / "extra.json").read_text())
            assert extra["checkpoint"] == str(pre / "checkpoints" / "last.pt")
            # afterok held it back until its own pretext cell had finished
            started = (runs / "grid" / "classify" / cell[1] / "starts.txt").stat().st_mtime
            assert started >= (pre / "result.json").stat().st_mtime


def test_failed_cell_reported_with_log_and_only_it_resubmitted(slurm_cluster, tmp_path):
    spec = two_stage_spec(
        "fail", {"seed": [0, 1]}, pretext_overrides={"fail_if_exists": "{run_dir}/FAIL"}
    )
    sweep = write_sweep(tmp_path, spec)
    runs = tmp_path / "runs"
    bad = runs / "fail" / "pretext" / "seed=1"
    bad.mkdir(parents=True)
    (bad / "FAIL").touch()
    submit(sweep, "slurm", runs, out=io.StringIO())
    statuses = wait_settled(sweep, runs, timeout_s=120)

    failed = statuses["pretext", "seed=1"]
    assert (failed.state, failed.scheduler_state) == ("failed", "FAILED")
    assert "FAIL exists" in failed.reason
    assert (
        "RuntimeError: fake_stage: failing because"
        in Path(failed.log.replace("_log.out", "_log.err")).read_text()
    )
    # its dependent job was cancelled by SLURM (kill-on-invalid-dep), the other seed finished
    assert (
        statuses["classify", "seed=1"].state,
        statuses["classify", "seed=1"].scheduler_state,
    ) == ("failed", "CANCELLED")
    assert statuses["pretext", "seed=0"].state == statuses["classify", "seed=0"].state == "done"
    status_text = subprocess.run(
        [
            ".venv/bin/python",
            "-m",
            "slurm.sweep",
            "status",
            str(sweep.path),
            "--runs-root",
            str(runs),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pretext      seed=1" in status_text and failed.log in status_text

    before = load_records(records_path(sweep, runs))
    (bad / "FAIL").unlink()
    groups = submit(sweep, "slurm", runs, out=io.StringIO())
    assert [(g.stage.name, [t.cell.name for t in g.tasks]) for g in groups] == [
        ("pretext", ["seed=1"]),
        ("classify", ["seed=1"]),
    ]
    statuses = wait_settled(sweep, runs, timeout_s=120)
    assert {s.state for s in statuses.values()} == {"done"}
    after = load_records(records_path(sweep, runs))
    assert after["pretext/seed=0"] == before["pretext/seed=0"]  # untouched
    assert (runs / "fail/pretext/seed=0/starts.txt").read_text() == "0\n"  # ran once


def test_time_limit_requeues_and_resumes_to_same_metrics(slurm_cluster, tmp_path):
    # slurmctld checks time limits every 30 s and sends the warning signal once fewer than
    # signal_delay_s + 30 s are left: with a 1-minute limit and 5 s, USR2 comes 25-55 s into a run
    # (a larger delay fires at the first check, possibly before Python has its handler). submitit
    # then calls StageJob.checkpoint() and requeues; the stage resumes from checkpoints/last.pt.
    steps, step_s = 120, 0.5  # 60 s of work: more than any one run gets
    spec = {
        "name": "requeue",
        "grid": {"seed": [5]},
        "stages": {
            "pretext": {
                "module": "fake_stage",
                "overrides": {"steps": steps, "step_s": step_s},
                "resources": {
                    "timeout_min": 1,
                    "slurm_signal_delay_s": 5,
                    "cpus_per_task": 1,
                    "mem_gb": 1,
                },
            }
        },
    }
    sweep = write_sweep(tmp_path, spec)
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    submit(sweep, "slurm", runs, out=io.StringIO())
    statuses = wait_settled(sweep, runs, timeout_s=240)
    status = statuses["pretext", "seed=5"]
    assert status.state == "done", status
    starts = [int(s) for s in (runs / "requeue/pretext/seed=5/starts.txt").read_text().split()]
    assert len(starts) >= 2 and starts[0] == 0 and all(0 < s < steps for s in starts[1:]), starts
    history = subprocess.run(
        ["sacct", "--duplicates", "-n", "-P", "-X", "-j", status.job_id, "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert history.count("REQUEUED") == len(starts) - 1 and history[-1] == "COMPLETED", history
    result = json.loads((runs / "requeue/pretext/seed=5/result.json").read_text())
    reference = tmp_path / "uninterrupted"
    assert result == fake_stage.main(
        fake_stage.parse_config([f"run_dir={reference}", f"steps={steps}", "seed=5"])
    )
    print(f"requeue test: starts at steps {starts}, {time.monotonic() - t0:.0f}s")
