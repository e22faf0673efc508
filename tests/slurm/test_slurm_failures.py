"""SLURM unreachable or refusing, without a cluster (fake commands that answer with the real
ones' words, tests/slurm/fake_slurm.py): one ``error:`` line naming the cluster file, exit 2,
nothing submitted, and what was submitted before a refusal is recorded and shown next time."""

from __future__ import annotations

import time

import fake_slurm
import pytest
from profiles import CLUSTER, two_stage, write_profile

from core.cli import run_cli
from orchestrate import pipeline
from orchestrate.jobs import expand, read_run_json, write_run_json
from orchestrate.slurm import _minutes


def run(path, capsys, *flags) -> tuple[int, str, str]:
    """``python -m orchestrate.pipeline --profile PATH --executor slurm --cluster local.yaml FLAGS``."""
    argv = ["--profile", str(path), "--executor", "slurm", "--cluster", CLUSTER, *flags]
    with pytest.raises(SystemExit) as stop:
        run_cli(pipeline.main, argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


@pytest.fixture()
def profile(tmp_path, fake_stage_path):
    return write_profile(tmp_path, two_stage(tmp_path), cluster=CLUSTER)


JOBS = "[4 jobs: pretext/pretext/ce/seed0, pretext/pretext/ce/seed1 and 2 more]"


def submissions(bin_dir) -> list[str]:
    return [c for c in fake_slurm.calls(bin_dir) if c.startswith("sbatch /")]


def test_unreachable_controller_is_one_line_and_nothing_is_submitted(
    profile, tmp_path, capsys, monkeypatch
):
    path, prof = profile
    no_config = fake_slurm.NO_CONFIG.format(cmd="sinfo")
    bin_dir = fake_slurm.install(tmp_path / "bin", monkeypatch, sinfo=(1, "", no_config))
    code, _, err = run(path, capsys)
    assert code == 2
    assert err == (
        f"error: {CLUSTER}: the SLURM controller does not answer: {' '.join(no_config.split())} "
        f"{JOBS}; nothing was submitted\n"
    )
    assert fake_slurm.calls(bin_dir) == ["sinfo -h -o %P|%l"]
    assert not any(read_run_json(j.run_dir) for j in expand(prof))


def test_unknown_partition_refused_by_sbatch_test_only(profile, tmp_path, capsys, monkeypatch):
    path, _ = profile
    refusal = "sbatch: error: invalid partition specified: debug\nallocation failure: Invalid partition name specified"  # fmt: skip
    bin_dir = fake_slurm.install(tmp_path / "bin", monkeypatch, test_only=(1, refusal))
    code, _, err = run(path, capsys)
    resources = "{'slurm_partition': 'debug', 'timeout_min': 5, 'cpus_per_task': 1, 'mem_gb': 1}"
    assert (code, err) == (2, (
        f"error: {CLUSTER}: sbatch --test-only refuses {resources}: sbatch: error: invalid "
        f"partition specified: debug allocation failure: Invalid partition name specified {JOBS}; "
        "nothing was submitted\n"
    ))  # fmt: skip
    (test_only,) = [c for c in fake_slurm.calls(bin_dir) if c.startswith("sbatch")]
    assert test_only.startswith("sbatch --test-only ") and not submissions(bin_dir)


def test_time_over_the_partition_limit(profile, tmp_path, capsys, monkeypatch):
    """A cluster that does not enforce partition limits at submission takes the job and leaves
    it pending for ever (PartitionTimeLimit): the pre-flight compares with sinfo's limit."""
    path, _ = profile
    bin_dir = fake_slurm.install(tmp_path / "bin", monkeypatch, sinfo=(0, "debug*|4:00\nlong|2-00:00:00", ""))  # fmt: skip
    code, _, err = run(path, capsys)
    assert (code, err) == (2, (
        f"error: {CLUSTER}: timeout_min=5 is over the time limit of partition debug (4 min, "
        f"sinfo): lower it or choose another partition {JOBS}; nothing was submitted\n"
    ))  # fmt: skip
    assert not submissions(bin_dir)
    assert [_minutes(x) for x in ("infinite", "4:00", "2:30:00", "2-00:00:00")] == [
        None, 4, 150, 2880
    ]  # fmt: skip


def test_a_refused_submission_keeps_what_went_before_and_shows_it_next_run(
    profile, tmp_path, capsys, monkeypatch
):
    path, prof = profile
    pre0, pre1, cls0, cls1 = expand(prof)
    # sbatch takes the first submission (the pretext array), refuses the next (a classify job)
    bin_dir = fake_slurm.install(tmp_path / "bin", monkeypatch, submissions_ok=1)
    code, out, err = run(path, capsys)
    assert (code, err) == (2, (
        f"error: {CLUSTER}: sbatch refused 1 classify job(s) ({fake_slurm.BAD_ACCOUNT}); the 2 "
        "job(s) submitted before it are recorded in their run.json: run the same command again "
        "to see them and submit the rest\n"
    ))  # fmt: skip
    assert "[0] 2 job(s): job(s) 101_0, 101_1" in out
    assert [read_run_json(j.run_dir).get("job_id") for j in (pre0, pre1, cls0, cls1)] == [
        "101_0", "101_1", None, None
    ]  # fmt: skip
    # next run: the submitted jobs are shown with their SLURM state (squeue; no accounting)
    fake_slurm.install(bin_dir, monkeypatch, squeue=(0, "101_0 PENDING\n101_1 RUNNING", ""))
    code, out, err = run(path, capsys, "--status")
    assert (code, err) == (0, "")
    assert "pending  pretext/pretext/ce/seed0" in out and "job 101_0 (PENDING)" in out
    assert "running  pretext/pretext/ce/seed1" in out and "job 101_1 (RUNNING)" in out
    # and once sbatch takes them, the rest is submitted after them, the pretext jobs not again
    code, out, err = run(path, capsys)
    assert (code, err) == (0, "")
    assert len(submissions(bin_dir)) == 4  # array, refused classify, then the two classify jobs
    scripts = [(bin_dir / f"script.{n}").read_text() for n in (3, 4)]
    assert "#SBATCH --dependency=afterok:101_0" in scripts[0]
    assert "#SBATCH --dependency=afterok:101_1" in scripts[1]
    assert read_run_json(cls0.run_dir)["job_id"] == "103"
    assert read_run_json(pre0.run_dir)["job_id"] == "101_0"


def test_unreachable_squeue_when_reading_job_states(profile, tmp_path, capsys, monkeypatch):
    path, prof = profile
    job = expand(prof)[0]
    write_run_json(
        job, "submitted", executor="slurm", job_id="7", folder=str(tmp_path / "sub"),
        log="x", result_pickle=str(tmp_path / "sub" / "7_0_result.pkl"), submitted=time.time(),
    )  # fmt: skip
    fake_slurm.install(tmp_path / "bin", monkeypatch, squeue=(1, "", fake_slurm.SQUEUE_DOWN))
    code, _, err = run(path, capsys, "--status")
    assert (code, err) == (2, (
        f"error: {CLUSTER}: cannot read the state of the submitted jobs (sacct does not know "
        f"them): {fake_slurm.SQUEUE_DOWN}\n"
    ))  # fmt: skip


def test_no_slurm_commands_is_one_line(profile, tmp_path, capsys, monkeypatch):
    path, _ = profile
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = run(path, capsys)
    assert (code, err) == (2, (
        f"error: {CLUSTER}: sbatch, sinfo, srun not found: this machine is not a SLURM submit "
        f"host {JOBS}; nothing was submitted\n"
    ))  # fmt: skip
