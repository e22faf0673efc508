"""The SLURM executor without a cluster: submission plan, job states from run.json + SLURM state +
submitit's result pickle, the requeueable job, the dry run."""

from __future__ import annotations

import json
import pickle
import time

import pytest
from profiles import two_stage, write_profile

from orchestrate import pipeline
from orchestrate.jobs import State, expand, job_state, write_run_json
from orchestrate.slurm import StageJob, plan


def _jobs(tmp_path, **pretext):
    return expand(write_profile(tmp_path, two_stage(tmp_path, **pretext))[1])


def test_fresh_plan_is_one_array_per_resources_then_one_job_per_upstream(tmp_path):
    variants = {"a": {}, "b": {}, "big": {"resources": {"tasks_per_node": 2}}}
    jobs = _jobs(tmp_path, variants=variants)
    groups, held = plan(jobs, {j.run_dir: State("missing") for j in jobs})
    pre = [j for j in jobs if j.stage == "pretext"]
    assert held == []
    assert [(g.jobs, g.after) for g in groups[:2]] == [(pre[:4], ()), (pre[4:], ())]
    assert groups[1].resources["tasks_per_node"] == 2
    # each transfer job waits for its own pretext job (afterok on that one)
    assert [(g.jobs[0].deps, g.after) for g in groups[2:]] == [(j.deps, j.deps) for j in jobs[6:]]
    assert all(len(g.jobs) == 1 for g in groups[2:]) and len(groups) == 2 + 6


def test_resubmit_plan_only_missing_or_failed_and_wires_dependencies(tmp_path):
    jobs = _jobs(tmp_path, variants={"a": {}, "b": {}})  # pretext a0 a1 b0 b1, classify a0 a1 b0 b1
    names = ["done", "failed", "running", "done", "failed", "failed", "missing", "failed"]
    state = {j.run_dir: State(s, job_id=f"1{i}") for i, (j, s) in enumerate(zip(jobs, names))}
    state[jobs[3].run_dir] = State("unknown", job_id="13")
    groups, held = plan(jobs, state)
    summary = [([j.name for j in g.jobs], g.after) for g in groups]
    assert summary == [
        # failed: resubmitted; upstream done: no dependency; same resources: one array
        (["pretext/pretext/a/seed1", "transfer/classify/a/seed0"], ()),
        (["transfer/classify/b/seed0"], (jobs[2].run_dir,)),  # upstream running: afterok on it
        (["transfer/classify/a/seed1"], (jobs[1].run_dir,)),  # upstream resubmitted now
    ]
    # the upstream of classify/b/seed1 is unknown (not resubmitted): it waits for a later submit
    assert held == [jobs[7]]
    only = plan(jobs, state, only=["transfer"])  # classify/a/seed1 waits for a failed pretext job
    assert [[j.name for j in g.jobs] for g in only[0]] == [
        ["transfer/classify/a/seed0"], ["transfer/classify/b/seed0"]
    ]  # fmt: skip
    assert only[1] == [jobs[5], jobs[7]]


def _record(tmp_path, job, age_s=3600.0, job_id="7_1"):
    pickle_path = tmp_path / "sub" / f"{job_id}_0_result.pkl"
    write_run_json(
        job, "submitted", executor="slurm", job_id=job_id, folder=str(tmp_path / "sub"),
        log=str(tmp_path / "sub" / f"{job_id}_0_log.out"), result_pickle=str(pickle_path),
        submitted=time.time() - age_s,
    )  # fmt: skip
    return pickle_path


def test_job_state_from_run_json_scheduler_state_and_pickle(tmp_path):
    job = _jobs(tmp_path)[0]
    run = job.run_dir
    assert job_state(run).state == "missing"
    write_run_json(job, "failed", log="x.log")
    assert (job_state(run).state, job_state(run).log) == ("failed", "x.log")  # local record
    pickle_path = _record(tmp_path, job)
    assert job_state(run, "PENDING").state == "pending"
    assert job_state(run, "REQUEUED").state == "pending"
    assert job_state(run, "RUNNING").state == "running"
    timeout = job_state(run, "TIMEOUT")
    assert (timeout.state, timeout.reason, timeout.job_id) == (
        "failed", "job ended TIMEOUT without a result", "7_1"
    )  # fmt: skip
    assert timeout.log.endswith("7_1_0_log.out")
    # sacct does not know it: just submitted -> pending; long ago -> unknown (not resubmitted)
    assert job_state(run, "UNKNOWN").state == "unknown"
    _record(tmp_path, job, age_s=1)
    assert job_state(run, "UNKNOWN").state == "pending"
    # the stage raised: submitit's pickle holds the traceback, its last line is the reason
    pickle_path.parent.mkdir(parents=True, exist_ok=True)
    pickle_path.write_bytes(
        pickle.dumps(("error", "Traceback (most recent call last):\nRuntimeError: boom\n"))
    )
    assert (job_state(run, "FAILED").state, job_state(run, "FAILED").reason) == (
        "failed",
        "RuntimeError: boom",
    )
    pickle_path.write_bytes(pickle.dumps(("success", {"x": 1.0})))
    assert job_state(run, "COMPLETED").reason == "the stage returned without writing result.json"
    (tmp_path / "runs/pretext/ce/seed0/result.json").write_text("{}")
    assert job_state(run, "RUNNING").state == "done"  # result written, job exiting  # fmt: skip


def test_stage_job_runs_stage_and_checkpoint_requeues_itself(tmp_path, fake_stage_path):
    import fake_stage

    job = StageJob("fake_stage", ["--config", "x.yaml", f"run_dir={tmp_path}", "steps=3", "seed=2"])
    assert job()["final_value"] == fake_stage.expected_value(2, 3)
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == ()
    assert pickle.loads(pickle.dumps(job)).argv == job.argv


def test_dry_run_prints_plan_and_submits_nothing(tmp_path, capsys):
    path, profile = write_profile(tmp_path, two_stage(tmp_path))
    assert pipeline.main(["--profile", str(path), "--executor", "slurm", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[0] 2 job(s), resources {'timeout_min': 5" in text
    assert "[1] 1 job(s) after <pretext/pretext/ce/seed0>" in text
    assert f"checkpoint={profile.runs_root}/pretext/ce/seed1" in text
    assert not list((tmp_path / "runs").rglob("run.json"))


def test_local_runs_count_as_missing_for_slurm(tmp_path):
    from orchestrate.slurm import states

    jobs = _jobs(tmp_path)
    write_run_json(jobs[0], "running")  # a killed local run
    write_run_json(jobs[1], "done")
    (tmp_path / "runs/pretext/ce/seed1/result.json").write_text(json.dumps({}))
    got = states(jobs)
    assert [got[j.run_dir].state for j in jobs] == ["missing", "done", "missing", "missing"]


@pytest.mark.parametrize("flag", ["--status", "--dry-run"])
def test_bad_cluster_file_is_a_user_error(tmp_path, flag):
    from core.config import ConfigError

    path, _ = write_profile(tmp_path, two_stage(tmp_path))
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        pipeline.main(
            [
                "--profile",
                str(path),
                "--executor",
                "slurm",
                "--cluster",
                str(tmp_path / "nope.yaml"),
                flag,
            ]
        )
