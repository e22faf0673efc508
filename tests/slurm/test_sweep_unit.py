"""Sweep files, grid, path scheme, submission plan and a local-executor run: no SLURM needed."""

from __future__ import annotations

import io
import json
import os
import pickle
import time

import pytest
import submitit
from sweep_specs import two_stage_spec, write_sweep

from slurm.launcher import StageJob, make_executor
from slurm.sweep import (
    CellStatus,
    Dependency,
    cell_status,
    collect_results,
    plan,
    scheduler_states,
    submit,
    sweep_status,
)
from slurm.sweep_file import SweepFileError, expand_grid, load_sweep, run_dir, stage_argv


def test_grid_expands_in_file_order_with_hydra_style_names():
    cells = expand_grid({"mask.kind": ["central", "random_block"], "seed": [0, 1], "lr": [0.1]})
    assert [c.name for c in cells] == [
        "mask.kind=central,seed=0,lr=0.1",
        "mask.kind=central,seed=1,lr=0.1",
        "mask.kind=random_block,seed=0,lr=0.1",
        "mask.kind=random_block,seed=1,lr=0.1",
    ]
    assert cells[3].values == {"mask.kind": "random_block", "seed": 1, "lr": 0.1}
    assert [c.name for c in expand_grid({})] == ["default"]


def test_path_scheme_and_argv(tmp_path):
    sweep = write_sweep(tmp_path, two_stage_spec("s", {"mask.kind": ["central"], "seed": [3]}))
    cell = expand_grid(sweep.grid)[0]
    pre = run_dir("/r", "s", "pretext", cell.name)
    assert str(pre) == "/r/s/pretext/mask.kind=central,seed=3"
    assert stage_argv(sweep, sweep.stages["pretext"], cell, "/r") == [
        f"run_dir={pre}",
        "mask.kind=central",
        "seed=3",
        "steps=4",
    ]
    # The dependent stage gets only its grid_keys, and the pretext run folder through {pretext}.
    assert stage_argv(sweep, sweep.stages["classify"], cell, "/r") == [
        "run_dir=/r/s/classify/mask.kind=central,seed=3",
        "seed=3",
        "steps=2",
        f"checkpoint={pre}/checkpoints/last.pt",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "x", "stages": {"a": {"module": "m"}}, "grdi": {}}, "unknown keys ['grdi']"),
        (
            {"name": "x", "stages": {"a": {"module": "m", "after": "b"}}},
            "after='b' must name an earlier stage",
        ),
        ({"name": "x", "stages": {"a": {"modul": "m"}}}, "needs at least `module"),
        (
            {
                "name": "x",
                "grid": {"seed": [0]},
                "stages": {"a": {"module": "m", "grid_keys": ["lr"]}},
            },
            "not all in grid",
        ),
        ({"name": "a/b", "stages": {"a": {"module": "m"}}}, "plain folder name"),
    ],
)
def test_bad_sweep_files_name_the_file_and_problem(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(spec))
    with pytest.raises(SweepFileError, match="bad.yaml") as err:
        load_sweep(path)
    assert message in str(err.value)


def test_unknown_placeholder_is_an_error(tmp_path):
    spec = two_stage_spec("s", {"seed": [0]})
    spec["stages"]["classify"]["overrides"]["checkpoint"] = "{pretrain}/last.pt"
    sweep = write_sweep(tmp_path, spec)
    with pytest.raises(SweepFileError, match=r"unknown placeholder 'pretrain'.*\{pretext\}"):
        stage_argv(sweep, sweep.stages["classify"], expand_grid(sweep.grid)[0], "/r")


def _statuses(sweep, states: dict[tuple[str, str], tuple[str, str | None]]):
    out = {}
    for stage in sweep.stages:
        for cell in expand_grid(sweep.grid):
            state, job = states.get((stage, cell.name), ("missing", None))
            out[stage, cell.name] = CellStatus(
                stage, cell.name, state, run_dir("/r", sweep.name, stage, cell.name), job
            )
    return out


def test_fresh_plan_is_one_array_then_one_job_per_cell_on_its_own_task(tmp_path):
    sweep = write_sweep(tmp_path, two_stage_spec("s", {"mask.kind": ["a", "b"], "seed": [0, 1]}))
    groups = plan(sweep, _statuses(sweep, {}), tmp_path)
    assert [(g.stage.name, len(g.tasks)) for g in groups] == [("pretext", 4)] + [
        ("classify", 1)
    ] * 4
    for i, group in enumerate(groups[1:]):
        assert group.dependency == Dependency("afterok", group=0, index=i)
        assert group.tasks[0].cell == groups[0].tasks[i].cell  # waits for its own pretext cell


def test_resubmit_plan_only_missing_or_failed_and_wires_dependencies(tmp_path):
    sweep = write_sweep(tmp_path, two_stage_spec("s", {"seed": [0, 1, 2, 3]}))
    c = [cell.name for cell in expand_grid(sweep.grid)]
    states = {
        ("pretext", c[0]): ("done", "10_0"),
        ("classify", c[0]): ("done", "11_0"),  # finished: not resubmitted
        ("pretext", c[1]): ("failed", "10_1"),
        ("classify", c[1]): ("failed", "11_1"),  # cancelled by its failed upstream
        ("pretext", c[2]): ("running", "10_2"),
        ("classify", c[2]): ("missing", None),  # waits for the running upstream job
        ("pretext", c[3]): ("done", "10_3"),
        ("classify", c[3]): ("failed", "11_3"),  # upstream done: no dependency
    }
    groups = plan(sweep, _statuses(sweep, states), tmp_path)
    summary = [(g.stage.name, [t.cell.name for t in g.tasks], g.dependency) for g in groups]
    assert summary == [
        ("pretext", [c[1]], None),
        ("classify", [c[2]], Dependency("afterok", job_id="10_2")),
        ("classify", [c[3]], None),
        ("classify", [c[1]], Dependency("afterok", group=0, index=0)),
    ]


def test_dry_run_prints_plan_and_submits_nothing(tmp_path):
    sweep = write_sweep(tmp_path, two_stage_spec("s", {"seed": [0, 1]}))
    out = io.StringIO()
    submit(sweep, "slurm", tmp_path / "runs", dry_run=True, out=out)
    text = out.getvalue()
    assert "[0] pretext: 2 cell(s)" in text
    assert "[2] classify: 1 cell(s), dependency afterok:<pretext#0[1]>" in text
    assert "checkpoint=" in text and "'timeout_min': 5" in text
    assert not (tmp_path / "runs").exists()


def test_stage_job_runs_stage_and_checkpoint_requeues_itself(tmp_path, fake_stage_path):
    import fake_stage

    job = StageJob("fake_stage", [f"run_dir={tmp_path}", "steps=3", "seed=2"])
    assert job() == {"final_value": fake_stage.expected_value(2, 3), "steps": 3.0}
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == ()
    assert pickle.loads(pickle.dumps(job)).argv == job.argv


def test_make_executor_rejects_unknown_cluster_and_parameters(tmp_path):
    with pytest.raises(ValueError, match="unknown cluster 'slrum'"):
        make_executor("slrum", tmp_path, {})
    with pytest.raises(NameError, match="gpus_per_nod"):
        make_executor("local", tmp_path, {"gpus_per_nod": 1})


def test_local_sweep_runs_both_stages_then_resubmits_nothing(tmp_path, fake_stage_path):
    sweep = write_sweep(
        tmp_path, two_stage_spec("loc", {"seed": [0, 1]}, resources={"timeout_min": 2})
    )
    runs = tmp_path / "runs"
    submit(sweep, "local", runs, out=io.StringIO())
    statuses = sweep_status(sweep, runs)
    assert {s.state for s in statuses.values()} == {"done"}
    rows = {(r["stage"], r["seed"]): r for r in collect_results(sweep, runs)}
    import fake_stage

    assert rows["pretext", 1]["final_value"] == fake_stage.expected_value(1, 4)
    assert rows["classify", 0]["final_value"] == fake_stage.expected_value(0, 2)
    info = json.loads((runs / "loc/classify/seed=1/run.json").read_text())
    assert (info["stage"], info["task"], info["variant"], info["seed"]) == (
        "transfer",
        "classify",
        "default",
        1,
    )
    out = io.StringIO()
    assert submit(sweep, "local", runs, out=out) == []
    assert "0 cells to submit, 4 done or in flight" in out.getvalue()


def _record(tmp_path, job_id="7_1", cluster="slurm", age_s=3600.0):
    return {
        "job_id": job_id,
        "cluster": cluster,
        "folder": str(tmp_path / "%j"),
        "stdout": str(tmp_path / job_id / f"{job_id}_0_log.out"),
        "submitted": time.time() - age_s,
    }


def _write_result_pickle(record, outcome):
    path = submitit.core.utils.JobPaths(record["folder"], job_id=record["job_id"]).result_pickle
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(outcome))


def test_cell_status_from_result_scheduler_state_and_pickle(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rec = _record(tmp_path)
    assert cell_status("p", "c", run, None, None).state == "missing"
    assert cell_status("p", "c", run, rec, "PENDING").state == "pending"
    assert cell_status("p", "c", run, rec, "REQUEUED").state == "pending"
    assert cell_status("p", "c", run, rec, "RUNNING").state == "running"
    # ended without a result and without a pickle: failed, with the SLURM state as the reason
    timeout = cell_status("p", "c", run, rec, "TIMEOUT")
    assert (timeout.state, timeout.reason, timeout.log) == (
        "failed",
        "job ended TIMEOUT without a result",
        rec["stdout"],
    )
    # sacct does not know it: just submitted -> pending; long ago -> unknown (not resubmitted)
    assert cell_status("p", "c", run, _record(tmp_path, age_s=1), "UNKNOWN").state == "pending"
    assert cell_status("p", "c", run, rec, "UNKNOWN").state == "unknown"
    # the stage raised: submitit's pickle holds the traceback, its last line is the reason
    _write_result_pickle(rec, ("error", "Traceback (most recent call last):\nRuntimeError: boom\n"))
    failed = cell_status("p", "c", run, rec, "FAILED")
    assert (failed.state, failed.reason) == ("failed", "RuntimeError: boom")
    (run / "result.json").write_text("{}")
    assert cell_status("p", "c", run, rec, "COMPLETED").state == "done"
    assert cell_status("p", "c", run, rec, "RUNNING").state == "done"  # result written, job exiting


def test_local_job_state_comes_from_its_pid(tmp_path):
    run = tmp_path / "run"
    rec = _record(tmp_path, job_id=str(os.getpid()), cluster="local")
    # this pytest process is no submitit job: the pid is not taken for a running job
    assert scheduler_states({"p/c": rec}) == {"p/c": "UNKNOWN"}
    _write_result_pickle(rec, ("success", {"x": 1.0}))
    status = cell_status("p", "c", run, rec, "UNKNOWN")
    assert (status.state, status.reason) == (
        "failed",
        "the stage returned without writing result.json",
    )
