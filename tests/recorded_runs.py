"""A profile's run folders as the pipeline leaves them, written by hand for the report tests
(orchestrate/budget.py, orchestrate/precision.py): load a profile text into ``tmp_path``, then one
run.json + result.json per job."""

import json
from pathlib import Path

from orchestrate.jobs import Job
from orchestrate.profile import Profile, load_profile

# What every fake profile starts with: its folders under tmp_path, 3 seeds, the built-in config.
HEAD = """name: {name}
runs_root: {root}/runs
results_dir: {root}/results
data: /nowhere
seeds: [0, 1, 2]
pretext:
  config: pretext/configs/builtin.yaml
"""


def fake_profile(tmp_path: Path, name: str, body: str) -> Profile:
    """:data:`HEAD` + ``body`` (the rest of ``pretext:`` and the tasks; ``{root}`` is filled with
    ``tmp_path``) as the profile file ``<name>.yaml``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(HEAD.format(name=name, root=tmp_path) + body.format(root=tmp_path))
    return load_profile(path)


def record(job: Job, result: dict, meta: dict | None = None) -> Path:
    """``job``'s run folder, finished with ``result``: run.json (its identity) and result.json;
    with ``meta``, a meta.json of it (as the stages record e.g. their precision)."""
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True)
    if meta is not None:
        (run_dir / "meta.json").write_text(json.dumps(meta))
    info = {"stage": job.stage, "task": job.task, "variant": job.variant, "seed": job.seed}
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "done"}))
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir
