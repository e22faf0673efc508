"""The run folder of a transfer run: what was asked, from which checkpoint, and what came out.

    <run_dir>/config.yaml     the resolved config (written at start)
    <run_dir>/meta.json       task, source checkpoint (path, sha256, method, arch, step), seed, data,
                              class names, elapsed time; written at start and again at the end
    <run_dir>/metrics.jsonl   one JSON line per logged epoch / iteration
    <run_dir>/result.json     flat {metric: float}, written atomically and last: its presence
                              means the run is finished

A finished run folder returns its recorded result without recomputing. Started again after a kill,
a run restarts from scratch (or, for mmengine runs, resumes from the work dir's checkpoint);
``result.json`` is never half-written. A folder started from another checkpoint (other sha256) or
with another config is refused unless ``force=true``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from core.atomic_io import atomic_write_json
from core.checkpoint import (
    CheckpointError,
    file_sha256,
    load_checkpoint,
    resolve_checkpoint_path,
)
from core.cli import UserError
from core.config import dump_yaml, read_yaml, save_config, to_dict

log = logging.getLogger(__name__)


class TransferError(UserError):
    """Bad input to a transfer run (dataset, classes, run folder); the message names the file."""


def source_meta(checkpoint: str | Path, expected_arch: str | None = None) -> dict[str, Any]:
    """Provenance of a pretext checkpoint: {path, sha256, method, arch, step}.

    Raises CheckpointError for a missing / foreign file or an arch other than ``expected_arch``.
    """
    if not str(checkpoint):
        raise CheckpointError("no checkpoint given: pass --checkpoint <pretext .pt or run folder>")
    state = load_checkpoint(checkpoint)
    if expected_arch and state["arch"] != expected_arch:
        raise CheckpointError(
            f"{checkpoint}: checkpoint arch is {state['arch']!r}, but {expected_arch!r} was asked for"
        )
    path = resolve_checkpoint_path(checkpoint)
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "method": state["method"],
        "arch": state["arch"],
        "step": int(state["step"]),
    }


def finished_result(run_dir: Path, cfg: Any, source: dict[str, Any]) -> dict[str, float] | None:
    """The recorded result if ``run_dir`` holds a finished run of this config and checkpoint.

    Raises TransferError when the folder was started with another checkpoint or config (unless
    ``cfg.force``); returns None for a fresh or unfinished folder.
    """
    meta_path, config_path = run_dir / "meta.json", run_dir / "config.yaml"
    if not getattr(cfg, "force", False):
        if meta_path.exists():
            old = json.loads(meta_path.read_text()).get("source", {}).get("sha256")
            if old and old != source["sha256"]:
                raise TransferError(
                    f"{meta_path}: the run folder was started from another checkpoint "
                    f"(sha256 {old[:12]}.., now {source['sha256'][:12]}.. of {source['path']}); "
                    "use another run_dir, or force=true to start again"
                )
        if config_path.exists():
            diff = _diff(read_yaml(config_path), to_dict(cfg))
            if diff:
                raise TransferError(
                    f"{config_path}: the run folder was started with a different config "
                    f"({', '.join(diff)}); use another run_dir, or force=true to start again"
                )
    result_path = run_dir / "result.json"
    if result_path.exists() and not getattr(cfg, "force", False):
        log.info("%s is finished; returning its recorded result", run_dir)
        return json.loads(result_path.read_text())
    return None


# Keys that may change between a run and a re-run of its folder without changing its results.
FREE_KEYS = {"force", "num_workers", "threads", "progress"}


def _diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key in FREE_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def start(run_dir: Path, cfg: Any, meta: dict[str, Any]) -> None:
    """Write the resolved config and the provenance (before any work)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_json(run_dir / "meta.json", {**meta, "status": "running"})
    log.info("transfer run %s\n%s", run_dir, dump_yaml(cfg))


def finish(run_dir: Path, result: dict[str, float], meta: dict[str, Any]) -> dict[str, float]:
    """Check the metrics are plain finite-or-nan floats, then write meta.json and result.json."""
    clean = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"result[{key!r}] = {value!r} is not a number")
        clean[key] = float(value)
    bad = [k for k, v in clean.items() if not math.isfinite(v)]
    if bad:
        log.warning("%s: non-finite metrics %s", run_dir, bad)
    atomic_write_json(run_dir / "meta.json", {**meta, "status": "done"})
    atomic_write_json(run_dir / "result.json", clean)
    return clean
