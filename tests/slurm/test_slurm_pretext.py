"""The real pretext stage swept on the SLURM test cluster: results reach the table builder, and a
preempted run (USR2 as a scheduler sends it) is requeued and resumes to the uninterrupted metrics."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from profiles import CLUSTER, run_slurm, wait_settled, write_profile

from orchestrate.tables import collect_runs

pytestmark = pytest.mark.slurm

STEPS = 40


def _checkpoint_step(path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def test_pretext_sweep_preempted_cell_resumes_and_feeds_tables(slurm_cluster, tiny_voc, tmp_path):
    tiny = {
        "data.root": str(tiny_voc),
        "data.num_workers": 0,
        "optim.batch_size": 8,
        "optim.steps": STEPS,
        "optim.warmup_steps": 2,
        "checkpoint_every": 4,
        "log_every": 2,
        "eval_images": 8,
        "threads": 1,
    }
    runs = tmp_path / "runs"
    spec = {
        "name": "real",
        "runs_root": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "data": str(tiny_voc),
        "seeds": [0],
        "pretext": {
            "config": "pretext/configs/builtin.yaml",
            "overrides": [f"{k}={v}" for k, v in tiny.items() if k != "data.root"],
            "resources": {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 2},
            "variants": {"ce": {"grid": {"mask.kind": ["central", "random_region"]}}},
        },
    }
    path, profile = write_profile(tmp_path, spec, cluster=CLUSTER)
    assert run_slurm(path, "--no-tables") == 0
    victim = json.loads((tmp_path / "runs/pretext/ce,mask.kind=central/seed0/run.json").read_text())
    ckpt = runs / "pretext/ce,mask.kind=central/seed0/checkpoints/last.pt"
    end = time.monotonic() + 120
    while _checkpoint_step(ckpt) < 8:  # preempt it once it has a mid-run checkpoint to resume from
        assert time.monotonic() < end, "no checkpoint past step 8 after 120 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", victim["job_id"]], check=True)

    state = wait_settled(profile, timeout_s=240)
    assert {s.state for s in state.values()} == {"done"}, state
    history = subprocess.run(
        ["sacct", "--duplicates", "-n", "-P", "-X", "-j", victim["job_id"], "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history
    # tqdm starts at the resumed step: the second run's first progress line is not 0/40
    stderr = Path(victim["stderr"]).read_text()
    after_requeue = stderr.split("DUE TO JOB REQUEUE")[-1].split("srun: error")[-1]
    first_bar = after_requeue.replace("\r", "\n").split("/40")[0].rsplit("|", 1)[-1].strip()
    assert 0 < int(first_bar) < STEPS, after_requeue[:300]

    # Same numbers as an uninterrupted run of the same cell (timing metrics aside).
    from pretext import train

    argv = ["--config", "pretext/configs/builtin.yaml", *[f"{k}={v}" for k, v in tiny.items()]]
    argv += ["mask.kind=central", "seed=0"]
    reference = train.main(train.parse_config([*argv, f"run_dir={tmp_path / 'reference'}"]))
    resumed = json.loads((ckpt.parent.parent / "result.json").read_text())
    for key in ("final_loss_rec", "inpaint_l1", "inpaint_l2", "inpaint_psnr", "steps"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key

    table = collect_runs(runs)
    assert sorted(zip(table["stage"], table["variant"], table["status"])) == [
        ("pretext", "ce,mask.kind=central", "done"),
        ("pretext", "ce,mask.kind=random_region", "done"),
    ]
    assert (table["m.steps"] == STEPS).all()
