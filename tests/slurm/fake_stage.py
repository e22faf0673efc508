"""A stand-in stage with the real stage API: resumable, deterministic, optionally failing.

argv: ``run_dir=DIR steps=N step_s=SECONDS seed=S fail=0|1 [key=value ...]``. Each step updates a
value deterministically from (seed, step) and checkpoints it to ``run_dir/checkpoints/last.pt``
(JSON inside), so an interrupted run resumed from its checkpoint ends with the same value as an
uninterrupted one. Each start appends the step it started from to ``run_dir/starts.txt``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULTS = {"run_dir": "", "steps": 5, "step_s": 0.0, "seed": 0, "fail": 0}


def parse_config(argv: list[str]) -> SimpleNamespace:
    values = dict(DEFAULTS, extra={})
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ValueError(f"fake_stage: expected key=value, got {arg!r}")
        if key in DEFAULTS:
            values[key] = type(DEFAULTS[key])(raw) if key != "run_dir" else raw
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


def main(cfg: SimpleNamespace) -> dict[str, float]:
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "value": float(cfg.seed)}
    with open(run_dir / "starts.txt", "a") as f:
        f.write(f"{state['step']}\n")
    if cfg.fail:
        raise RuntimeError(f"fake_stage: asked to fail (run_dir={run_dir})")
    for step in range(state["step"], cfg.steps):
        time.sleep(cfg.step_s)
        state = {"step": step + 1, "value": (state["value"] * 1.5 + step + cfg.seed) % 97.0}
        _write_json(ckpt, state)
    metrics = {"final_value": state["value"], "steps": float(state["step"])}
    _write_json(run_dir / "result.json", metrics)
    return metrics
