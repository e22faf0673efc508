"""kill -9 a ``make table`` pipeline (its whole process group) mid-way, twice; run again it finishes
every job without recomputing finished ones, and the tables hold each run exactly once."""

import json
import os
import textwrap
from pathlib import Path

import pandas as pd

from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint
from orchestrate.jobs import expand
from orchestrate.profile import load_profile
from orchestrate.tables import Column, build_table, collect_runs, write_table

# The downstream job: a stand-in for a transfer stage (reads the pretext result, writes its own).
STAGE = textwrap.dedent(
    """
    import json, pathlib, sys
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    run = pathlib.Path(args["run_dir"]); run.mkdir(parents=True, exist_ok=True)
    with open(run.parent.parent / "calls.log", "a") as fh:
        fh.write(str(run) + "\\n")
    pretext = json.loads((pathlib.Path(args["checkpoint"]) / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({"value": pretext["final_loss_rec"]}))
    """
)
REPO = Path(__file__).resolve().parents[2]
PRETEXT = ["data.num_workers=0", "optim.batch_size=8", "optim.steps=16", "optim.warmup_steps=2",
           "checkpoint_every=2", "log_every=1", "eval_images=4", "threads=1"]  # fmt: skip


def write_profile(tmp_path, voc):
    (tmp_path / "fakestages").mkdir()
    (tmp_path / "fakestages" / "__init__.py").write_text("")
    (tmp_path / "fakestages" / "stage.py").write_text(STAGE)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: tiny
            runs_root: {tmp_path / "runs"}
            results_dir: {tmp_path / "results"}
            data: {voc}
            seeds: [0]
            parallel: 1
            pretext:
              config: pretext/configs/builtin.yaml
              overrides: {json.dumps(PRETEXT)}
              variants:
                ce: {{}}
                ce_central: {{overrides: [mask.kind=central]}}
            transfer:
              classify:
                module: fakestages.stage
                args: ["checkpoint={{checkpoint}}"]
                variants: [ce, ce_central]
            """
        )
    )
    return path


def test_kill9_pipeline_mid_way_then_rerun(fork_server, tiny_voc, tmp_path, waiter):
    profile_path = write_profile(tmp_path, tiny_voc)
    profile = load_profile(profile_path)
    jobs = {j.name: j for j in expand(profile)}
    ce, central = jobs["pretext/pretext/ce/seed0"], jobs["pretext/pretext/ce_central/seed0"]
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    argv = ["--profile", str(profile_path), "--no-tables"]

    def step_of(job):
        path = os.path.join(job.run_dir, "checkpoints", "last.pt")
        return load_checkpoint(path)["step"] if os.path.exists(path) else -1

    def reached(pid, predicate):
        return lambda: predicate() or not fork_server.running(pid)

    # kill 1: inside the first pretext job's training
    pid, log = fork_server.start("orchestrate.pipeline", argv, env=env)
    waiter(reached(pid, lambda: step_of(ce) >= 4), 120, "pretext ce at step 4")
    assert fork_server.kill(pid) == -9, log.read_text()
    # kill 2: the first job (and its downstream, maybe) done, the second pretext job training
    pid, log = fork_server.start("orchestrate.pipeline", argv, env=env)
    waiter(reached(pid, lambda: step_of(central) >= 2), 120, "pretext ce_central at step 2")
    assert fork_server.kill(pid) == -9, log.read_text()
    done_before = {
        name: os.stat(os.path.join(j.run_dir, "result.json")).st_mtime_ns
        for name, j in jobs.items()
        if os.path.exists(os.path.join(j.run_dir, "result.json"))
    }
    assert "pretext/pretext/ce/seed0" in done_before
    stale = collect_runs(profile.runs_root)
    assert "running" in set(stale["status"])  # a killed job still says running: rerun picks it up

    pid, log = fork_server.start("orchestrate.pipeline", argv, env=env)
    assert fork_server.wait(pid) == 0, log.read_text()

    # finished jobs were not recomputed; the killed ones resumed from their checkpoints
    for name, mtime in done_before.items():
        assert os.stat(os.path.join(jobs[name].run_dir, "result.json")).st_mtime_ns == mtime, name
    central_log = Path(central.run_dir, "log.txt").read_text()
    assert "resuming" in central_log and central_log.count("\n$ ") == 2
    for job in (ce, central):
        steps = [r["step"] for r in read_jsonl(os.path.join(job.run_dir, "metrics.jsonl"))]
        assert steps == list(range(1, 17)), job.name
    calls = (tmp_path / "runs" / "transfer" / "classify" / "calls.log").read_text().split()
    assert sorted(calls) == sorted({j.run_dir for j in jobs.values() if j.stage == "transfer"})

    # one row per run, all done; the table has one value per cell and reads back whole
    runs = collect_runs(profile.runs_root)
    assert len(runs) == len(jobs) and runs["run_dir"].is_unique
    assert set(runs["status"]) == {"done"}
    for job in jobs.values():
        assert json.loads(Path(job.run_dir, "run.json").read_text())["status"] == "done"
    columns = (Column("value", "transfer", "classify", "value", 1.0, 4),
               Column("steps", "pretext", "pretext", "steps", 1.0, 0))  # fmt: skip
    display, long = build_table(runs, columns, [("CE", "ce"), ("CE central", "ce_central")])
    assert list(long["n"]) == [1, 1, 1, 1] and list(long["expected"]) == [1, 1, 1, 1]
    write_table(display, long, tmp_path / "results", "t", "T")
    back = pd.read_csv(tmp_path / "results" / "t.csv")
    assert back.shape == (2, 3) and list(back["steps"]) == ["16 (n=1)", "16 (n=1)"]
