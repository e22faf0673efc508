"""The pre-flight against the real single-node cluster (tests/slurm/conftest.py): sbatch's own
refusal joins the profile's other mistakes, nothing is submitted; a stopped slurmctld is one
``error:`` line."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from mistake_profiles import mistakes_profile
from profiles import CLUSTER, two_stage, write_profile

from core.cli import run_cli
from orchestrate import pipeline
from orchestrate.jobs import expand, read_run_json
from orchestrate.profile import load_profile

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        run_cli(pipeline.main, argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def queued_names() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True,
                          check=True).stdout.split()  # fmt: skip


def test_mistakes_and_a_bad_partition_are_reported_whole_and_nothing_is_submitted(
    slurm_cluster, tmp_path, tiny_voc, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    path = mistakes_profile(tmp_path, tiny_voc)
    cluster = tmp_path / "site.yaml"
    cluster.write_text("resources:\n  slurm_partition: nopart\n")
    code, _, err = run(
        ["--profile", str(path), "--executor", "slurm", "--cluster", str(cluster)], capsys
    )
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == f"error: {path}: 5 problems in the 7 jobs to run; nothing was submitted"
    headings = [line for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert headings == [
        "  configs (each job's argv as its stage's parse_config reads it):",
        "  missing files and folders:",
        "  present but unusable:",
        f"  cluster {cluster}:",
    ]
    assert f"    {tmp_path}/no_pretrain_set/VOC2007" in lines
    assert f"    {tmp_path}/no_VOC2012" in lines and f"    {tmp_path}/bogus.pt" in lines
    assert lines[-1] == (
        "    sbatch --test-only refuses {'slurm_partition': 'nopart'}: sbatch: error: invalid "
        "partition specified: nopart allocation failure: Invalid partition name specified "
        "[7 jobs: pretext/pretext/ce/seed0, pretext/pretext/ae/seed0 and 5 more]"
    )
    jobs = expand(load_profile(path, cluster=str(cluster)))
    assert not any(read_run_json(j.run_dir) for j in jobs)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [".pipeline.lock"]  # only the lock
    assert not [n for n in queued_names() if n.startswith("mistakes.")]


def test_a_stopped_slurmctld_is_one_error_line(
    slurm_cluster, tmp_path, capsys, fake_stage_path, monkeypatch
):
    path, prof = write_profile(tmp_path, two_stage(tmp_path, name="down"), cluster=CLUSTER)
    pidfile = slurm_cluster / "pids" / "slurmctld.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, 15)  # the daemon the session's fixture started, by its recorded pid
    for _ in range(300):  # until it has exited (gone, or a zombie nobody reaped yet)
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    try:
        code, _, err = run(
            ["--profile", str(path), "--executor", "slurm", "--cluster", CLUSTER], capsys
        )
    finally:  # the other tests need the cluster back (start restarts every daemon)
        env = {**os.environ, "CE_SLURM_STATE": str(slurm_cluster),
               "CE_SLURM_PORT": os.environ.get("CE_SLURM_TEST_PORT", "6837")}  # fmt: skip
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster.sh"), "start"], env=env,
                       check=True, capture_output=True, timeout=180)  # fmt: skip
    assert (code, err) == (2, (
        f"error: {CLUSTER}: the SLURM controller does not answer: slurm_load_partitions: Unable "
        "to contact slurm controller (connect failure) [4 jobs: pretext/pretext/ce/seed0, "
        "pretext/pretext/ce/seed1 and 2 more]; nothing was submitted\n"
    ))  # fmt: skip
    assert not any(read_run_json(j.run_dir) for j in expand(prof))
