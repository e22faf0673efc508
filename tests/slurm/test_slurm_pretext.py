"""The real pretext stage swept on the SLURM test cluster: results reach the table builder, and a
preempted run (USR2 as a scheduler sends it) is requeued and resumes to the uninterrupted metrics."""

from __future__ import annotations

import io
import json
import subprocess
import time

import pytest
from sweep_specs import wait_settled, write_sweep

from eval.tables import collect_runs
from slurm.sweep import submit

pytestmark = pytest.mark.slurm

STEPS = 40


def _checkpoint_step(path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
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
    spec = {
        "name": "real",
        "grid": {"mask.kind": ["central", "random_region"], "seed": [0]},
        "stages": {
            "pretext": {
                "module": "pretext.train",
                "overrides": tiny,
                "resources": {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 2},
            }
        },
    }
    sweep = write_sweep(tmp_path, spec)
    runs = tmp_path / "runs"
    groups = submit(sweep, "slurm", runs, out=io.StringIO())
    victim = groups[0].jobs[0]  # mask.kind=central
    ckpt = runs / "real/pretext/mask.kind=central,seed=0/checkpoints/last.pt"
    end = time.monotonic() + 120
    while _checkpoint_step(ckpt) < 8:  # preempt it once it has a mid-run checkpoint to resume from
        assert time.monotonic() < end, "no checkpoint past step 8 after 120 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", victim.job_id], check=True)

    statuses = wait_settled(sweep, runs, timeout_s=240)
    assert {s.state for s in statuses.values()} == {"done"}, statuses
    history = subprocess.run(
        ["sacct", "--duplicates", "-n", "-P", "-X", "-j", victim.job_id, "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history
    # tqdm starts at the resumed step: the second run's first progress line is not 0/40
    after_requeue = victim.stderr().split("DUE TO JOB REQUEUE")[-1].split("srun: error")[-1]
    first_bar = after_requeue.replace("\r", "\n").split("/40")[0].rsplit("|", 1)[-1].strip()
    assert 0 < int(first_bar) < STEPS, after_requeue[:300]

    # Same numbers as an uninterrupted run of the same cell (timing metrics aside).
    from pretext import train

    argv = [f"{k}={v}" for k, v in tiny.items()] + ["mask.kind=central", "seed=0"]
    reference = train.main(train.parse_config([*argv, f"run_dir={tmp_path / 'reference'}"]))
    resumed = json.loads((ckpt.parent.parent / "result.json").read_text())
    for key in ("final_loss_rec", "inpaint_l1", "inpaint_l2", "inpaint_psnr", "steps"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key

    table = collect_runs(runs)
    assert sorted(zip(table["stage"], table["variant"], table["status"])) == [
        ("pretext", "mask.kind=central", "done"),
        ("pretext", "mask.kind=random_region", "done"),
    ]
    assert (table["m.steps"] == STEPS).all()
