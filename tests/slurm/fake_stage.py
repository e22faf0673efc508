"""A stand-in stage with the real stage API: resumable, deterministic, optionally failing.

argv: ``run_dir=DIR steps=N step_s=SECONDS seed=S [fail_if_exists=PATH] [checkpoint=PATH] [k=v]``
(``--config FILE`` is ignored). Each step updates a value deterministically from (seed, step and
the value of the ``checkpoint=`` run folder's result) and checkpoints it to
``run_dir/checkpoints/last.pt`` (JSON inside), so an interrupted run resumed from its checkpoint
ends with the same value as an uninterrupted one. Each start appends the step it started from to
``run_dir/starts.txt``; other keys are saved in ``run_dir/extra.json``; a ``checkpoint=`` that
does not exist is an error (like a transfer stage started before its pretext run finished). Each
task of a multi-task SLURM job records SLURM_PROCID / SLURM_NTASKS in ``run_dir/ranks/<procid>``;
task 0 does the work. ``python -m fake_stage ARGV`` runs it as the local executor does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULTS = {"run_dir": "", "steps": 5, "step_s": 0.0, "seed": 0, "fail_if_exists": ""}


def parse_config(argv: list[str]) -> SimpleNamespace:
    values = dict(DEFAULTS, extra={})
    argv = [
        a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")
    ]
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ValueError(f"fake_stage: expected key=value, got {arg!r}")
        if key in DEFAULTS:
            values[key] = type(DEFAULTS[key])(raw)
        else:
            values["extra"][key] = raw  # grid keys of the real stages, recorded only
    if not values["run_dir"]:
        raise ValueError("fake_stage: run_dir=... is required")
    return SimpleNamespace(**values)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def expected_value(seed: int, steps: int, start: float = 0.0) -> float:
    """The final value of an uninterrupted run (the oracle for resumed ones); ``start``: the value
    of the ``checkpoint=`` run folder's result."""
    value = float(seed) + start
    for step in range(steps):
        value = (value * 1.5 + step + seed) % 97.0
    return value


def main(cfg: SimpleNamespace) -> dict[str, float]:
    run_dir = Path(cfg.run_dir)
    rank, ntasks = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1")
    if ntasks != "1":
        (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "ranks" / rank, {"procid": int(rank), "ntasks": int(ntasks)})
        if rank != "0":
            return {}
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    upstream = Path(cfg.extra.get("checkpoint", "")) / "result.json"
    start = json.loads(upstream.read_text())["final_value"] if upstream.is_file() else 0.0
    state = (
        json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "value": cfg.seed + start}
    )
    with open(run_dir / "starts.txt", "a") as f:
        f.write(f"{state['step']}\n")
    _write_json(run_dir / "extra.json", cfg.extra)
    if cfg.fail_if_exists and Path(cfg.fail_if_exists).exists():
        raise RuntimeError(f"fake_stage: failing because {cfg.fail_if_exists} exists")
    if "checkpoint" in cfg.extra and not Path(cfg.extra["checkpoint"]).exists():
        raise FileNotFoundError(f"fake_stage: checkpoint {cfg.extra['checkpoint']} does not exist")
    for step in range(state["step"], cfg.steps):
        time.sleep(cfg.step_s)
        state = {"step": step + 1, "value": (state["value"] * 1.5 + step + cfg.seed) % 97.0}
        _write_json(ckpt, state)
    value = state["value"]
    metrics = {"final_value": value, "steps": float(state["step"]), "train_time_s": 60.0 * cfg.steps,
               "mAP": value / 100, "svm_best_mAP": value / 200, "knn_mAP": value / 300}  # fmt: skip
    _write_json(run_dir / "result.json", metrics)
    return metrics


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
