"""The local pipeline: runs only what is missing, respects dependencies, records failures."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.config import ConfigError
from orchestrate.jobs import expand
from orchestrate.local import run_pipeline
from orchestrate.profile import load_profile

STAGE = textwrap.dedent(
    """
    import json, pathlib, sys
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    run = pathlib.Path(args["run_dir"]); run.mkdir(parents=True, exist_ok=True)
    if args.get("fail") == "yes":
        sys.exit("failing on purpose")
    with open(run.parent.parent / "calls.log", "a") as fh:
        fh.write(run.name + "\\n")
    (run / "result.json").write_text(json.dumps({"value": float(args.get("seed", 0)), "ckpt": args.get("checkpoint", "")}))
    """
)


@pytest.fixture()
def profile(tmp_path, monkeypatch):
    pkg = tmp_path / "fakestages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text(STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: t
            runs_root: {tmp_path / "runs"}
            results_dir: {tmp_path / "results"}
            data: /nowhere
            seeds: [0, 1]
            pretext:
              config: pretext/configs/builtin.yaml
              variants:
                good: {{}}
                bad: {{overrides: [fail=yes], seeds: [0]}}
            transfer:
              classify:
                module: fakestages.stage
                args: ["checkpoint={{checkpoint}}"]
                variants: [good, bad]
            """
        )
    )
    prof = load_profile(path)
    return prof


def test_expand_builds_the_job_graph(profile):
    jobs = expand(profile)
    names = [j.name for j in jobs]
    assert names == [
        "pretext/pretext/good/seed0", "pretext/pretext/good/seed1", "pretext/pretext/bad/seed0",
        "transfer/classify/good/seed0", "transfer/classify/good/seed1", "transfer/classify/bad/seed0",
    ]  # fmt: skip
    good0 = jobs[3]
    assert good0.deps == (jobs[0].run_dir,) and f"checkpoint={jobs[0].run_dir}" in good0.argv
    assert jobs[0].run_dir.endswith("runs/pretext/good/seed0")


def test_runs_missing_jobs_only_and_blocks_dependents_of_failures(profile, monkeypatch):
    jobs = expand(profile)
    # Swap the pretext module for the fake stage (same argv handling).
    fake = [j.__class__(**{**j.__dict__, "module": "fakestages.stage"}) for j in jobs]
    monkeypatch.setattr("orchestrate.local.expand", lambda p: fake)
    states = run_pipeline(profile, parallel=2, out=sys.stderr)
    assert states["pretext/pretext/bad/seed0"] == "failed"
    assert states["transfer/classify/bad/seed0"] == "blocked"
    assert states["transfer/classify/good/seed1"] == "done"
    with open(fake[2].run_dir + "/run.json") as fh:
        bad = json.load(fh)
    assert bad["status"] == "failed" and "failing on purpose" in "\n".join(bad["log_tail"])
    calls = Path(fake[0].run_dir).parent.parent / "calls.log"
    first = calls.read_text().split()
    assert sorted(first) == ["seed0", "seed1"]
    # Second invocation: nothing finished is recomputed; the failed job is retried (and fails again).
    states = run_pipeline(profile, parallel=1, out=sys.stderr)
    assert calls.read_text().split() == first
    assert states["pretext/pretext/bad/seed0"] == "failed"


def test_profile_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrunz_root: y\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_profile(bad)


@pytest.mark.parametrize("name", ["builtin", "paper"])
def test_shipped_profiles_expand(name):
    from orchestrate.profile import profile_path

    jobs = expand(load_profile(profile_path(name)))
    assert any(j.stage == "pretext" for j in jobs) and any(j.stage == "transfer" for j in jobs)
    for job in jobs:
        assert all(dep in {j.run_dir for j in jobs} for dep in job.deps)


def test_second_pipeline_on_the_same_runs_folder_is_refused(profile, tmp_path):
    from orchestrate.jobs import PipelineBusy, runs_lock

    busy = r"\.pipeline\.lock.*another pipeline \(pid \d+\)"
    with runs_lock(profile.runs_root), pytest.raises(PipelineBusy, match=busy):
        run_pipeline(profile, out=sys.stderr)
    # released on exit; a holder killed with -9 releases it too (the kernel drops flocks)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from orchestrate.jobs import runs_lock\n"
         f"with runs_lock({str(profile.runs_root)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(PipelineBusy, match=f"pid {holder.pid}"), runs_lock(profile.runs_root):
        pass
    holder.kill()
    holder.wait()
    with runs_lock(profile.runs_root):
        pass
