"""Profiles run by the SLURM executor on a real single-node cluster (tests/slurm/conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fake_stage
import pytest
from profiles import CLUSTER, FAST, run_slurm, two_stage, wait_settled, write_profile

from orchestrate import pipeline
from orchestrate.jobs import expand, read_run_json

pytestmark = pytest.mark.slurm


def _submitted(text: str) -> list[str]:
    """Job ids of the `[g] n job(s) ...: job(s) <ids>` lines of a submit."""
    lines = [line for line in text.splitlines() if ": job(s) " in line]
    return [i for line in lines for i in line.split(": job(s) ")[1].split(", ")]


def _profile(tmp: Path, which: str) -> dict:
    """random_init (seed 0) and a gridded ce (2 mask kinds x seeds 0, 1): fake pretext ->
    fake classify (transfer) -> fake frozen (eval)."""
    spec = two_stage(tmp / which, name="e2e", variants={
        "random_init": {"title": "Random", "seeds": [0]},
        "ce": {"title": "CE", "grid": {"mask.kind": ["central", "random_block"]}},
    })  # fmt: skip
    spec["eval"] = {
        "frozen": {**spec["transfer"]["classify"], "args": ["checkpoint={checkpoint}", "steps=3"]}
    }
    return spec


def test_profile_end_to_end_tables_equal_local_and_rerun_submits_only_missing(
    slurm_cluster, tmp_path, capsys
):
    for which in ("local", "slurm"):
        (tmp_path / which).mkdir()
    local_path, local = write_profile(tmp_path / "local", _profile(tmp_path, "local"))
    assert pipeline.main(["--profile", str(local_path), "--parallel", "2"]) == 0
    capsys.readouterr()

    spec = _profile(tmp_path, "slurm")
    path, profile = write_profile(tmp_path / "slurm", spec, cluster=CLUSTER)
    jobs = expand(profile)
    assert len(jobs) == 15
    assert run_slurm(path) == 0  # submits everything and returns
    first = capsys.readouterr().out
    ids = _submitted(first)
    assert len(ids) == 15 and "run the same command again" in first
    assert not Path(profile.results_dir).exists()
    # pretext: one array of 5; transfer / eval: afterok on their own pretext job
    array = ids[0].split("_")[0]
    assert ids[:5] == [f"{array}_{i}" for i in range(5)]
    assert first.count(f"after {array}_") == 5  # classify + frozen of one pretext job share one
    assert run_slurm(path) == 0  # again while running: progress, nothing submitted
    again = capsys.readouterr().out
    assert _submitted(again) == [] and "jobs done" in again and "total:" in again

    state = wait_settled(profile, timeout_s=100)
    assert {s.state for s in state.values()} == {"done"}, state
    assert {s.scheduler_state for s in state.values()} == {"COMPLETED"}
    for job in jobs:
        run = Path(job.run_dir)
        info = read_run_json(run)
        assert info["executor"] == "slurm" and info["job_id"] in ids
        for dep in job.deps:  # afterok held it back until its pretext run had finished
            assert (run / "starts.txt").stat().st_mtime >= (
                Path(dep) / "result.json"
            ).stat().st_mtime
    assert run_slurm(path) == 0  # all done: the tables
    assert "all jobs done" in capsys.readouterr().out
    tables = sorted(p.name for p in Path(local.results_dir).glob("*.*") if "runs" not in p.name)
    assert "table2_transfer.csv" in tables and "frozen_layers.csv" in tables
    for name in tables:
        if name != "README.md":
            assert (Path(profile.results_dir) / name).read_text() == (
                Path(local.results_dir) / name
            ).read_text(), name
    t2 = (Path(profile.results_dir) / "table2_transfer.csv").read_text()
    assert "(n=2)" in t2 and "CE (mask.kind=random_block)" in t2

    # a run folder lost: the next call submits that job only, and it ends with the same result
    victim = next(j for j in jobs if j.task == "classify" and j.variant.endswith("random_block"))
    before = json.loads((Path(victim.run_dir) / "result.json").read_text())
    shutil.rmtree(victim.run_dir)
    assert run_slurm(path) == 0
    out = capsys.readouterr().out
    assert len(_submitted(out)) == 1 and "[0] 1 job(s):" in out
    assert read_run_json(victim.run_dir)["job_id"] == _submitted(out)[0]
    state = wait_settled(profile, timeout_s=60)
    assert {s.state for s in state.values()} == {"done"}
    assert json.loads((Path(victim.run_dir) / "result.json").read_text()) == before


def test_failed_job_reported_with_log_and_only_it_resubmitted(slurm_cluster, tmp_path, capsys):
    marker = tmp_path / "FAIL"
    marker.touch()
    spec = two_stage(tmp_path, name="fail", variants={
        "good": {"seeds": [0]}, "bad": {"seeds": [0], "overrides": [f"fail_if_exists={marker}"]},
    })  # fmt: skip
    path, profile = write_profile(tmp_path, spec, cluster=CLUSTER)
    assert run_slurm(path, "--no-tables") == 0
    state = wait_settled(profile, timeout_s=90)
    failed = state["pretext/pretext/bad/seed0"]
    assert (failed.state, failed.scheduler_state) == ("failed", "FAILED")
    assert failed.reason == f"RuntimeError: fake_stage: failing because {marker} exists"
    err = Path(failed.log.replace("_log.out", "_log.err")).read_text()
    assert "RuntimeError: fake_stage: failing because" in err
    # its dependent job was cancelled by SLURM (kill-on-invalid-dep); the other variant finished
    cancelled = state["transfer/classify/bad/seed0"]
    assert (cancelled.state, cancelled.scheduler_state) == ("failed", "CANCELLED")
    assert state["pretext/pretext/good/seed0"].state == "done"
    assert state["transfer/classify/good/seed0"].state == "done"
    status = subprocess.run(
        [sys.executable, "-m", "orchestrate.pipeline", "--profile", str(path), "--executor", "slurm",
         "--status"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(li for li in status.splitlines() if "pretext/pretext/bad/seed0" in li)
    assert "failed" in line and failed.log in line and "RuntimeError" in line
    assert "total: 2 done, 2 failed" in status

    good = read_run_json(profile.runs_root + "/pretext/good/seed0")
    marker.unlink()
    capsys.readouterr()
    assert run_slurm(path, "--no-tables") == 0
    ids = _submitted(capsys.readouterr().out)
    assert len(ids) == 2
    assert read_run_json(profile.runs_root + "/pretext/bad/seed0")["job_id"] == ids[0]
    assert read_run_json(profile.runs_root + "/transfer/classify/bad/seed0")["job_id"] == ids[1]
    state = wait_settled(profile, timeout_s=90)
    assert {s.state for s in state.values()} == {"done"}
    assert read_run_json(profile.runs_root + "/pretext/good/seed0") == good  # untouched
    assert (Path(profile.runs_root) / "pretext/good/seed0/starts.txt").read_text() == "0\n"


def test_time_limit_requeues_and_resumes_to_same_metrics(slurm_cluster, tmp_path):
    # slurmctld checks time limits every 30 s and sends the warning signal once fewer than
    # signal_delay_s + 30 s are left: with a 1-minute limit and 5 s, USR2 comes 25-55 s into a run.
    # submitit then calls StageJob.checkpoint() and requeues; the stage resumes from its checkpoint.
    steps, step_s = 120, 0.5  # 60 s of work: more than any one run gets
    spec = two_stage(tmp_path, name="requeue", variants={"ce": {"seeds": [5]}},
                     overrides=[f"steps={steps}", f"step_s={step_s}"],
                     resources={**FAST, "timeout_min": 1, "slurm_signal_delay_s": 5})  # fmt: skip
    del spec["transfer"]
    path, profile = write_profile(tmp_path, spec, cluster=CLUSTER)
    t0 = time.monotonic()
    assert run_slurm(path, "--no-tables") == 0
    state = wait_settled(profile, timeout_s=200)["pretext/pretext/ce/seed5"]
    assert state.state == "done", state
    run = Path(profile.runs_root) / "pretext/ce/seed5"
    starts = [int(s) for s in (run / "starts.txt").read_text().split()]
    assert len(starts) >= 2 and starts[0] == 0 and all(0 < s < steps for s in starts[1:]), starts
    history = subprocess.run(
        ["sacct", "--duplicates", "-n", "-P", "-X", "-j", state.job_id, "-o", "State"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert history.count("REQUEUED") == len(starts) - 1 and history[-1] == "COMPLETED", history
    reference = fake_stage.main(
        fake_stage.parse_config([f"run_dir={tmp_path / 'ref'}", f"steps={steps}", "seed=5"])
    )
    assert json.loads((run / "result.json").read_text()) == reference
    print(f"requeue test: starts at steps {starts}, {time.monotonic() - t0:.0f}s")


def test_two_task_job_runs_every_task(slurm_cluster, tmp_path):
    spec = two_stage(tmp_path, name="ddp", variants={
        "ddp": {"seeds": [0], "resources": {"tasks_per_node": 2, "cpus_per_task": 1}},
    })  # fmt: skip
    del spec["transfer"]
    path, profile = write_profile(tmp_path, spec, cluster=CLUSTER)
    assert expand(profile)[0].resources["tasks_per_node"] == 2
    assert run_slurm(path, "--no-tables") == 0
    state = wait_settled(profile, timeout_s=60)["pretext/pretext/ddp/seed0"]
    assert (state.state, state.scheduler_state) == ("done", "COMPLETED")
    ranks = Path(profile.runs_root) / "pretext/ddp/seed0/ranks"
    got = sorted(json.loads(p.read_text())["procid"] for p in ranks.iterdir())
    assert got == [0, 1]
    assert {json.loads(p.read_text())["ntasks"] for p in ranks.iterdir()} == {2}
