"""The run folder of every stage (pretext, transfer, eval): what was asked, what was read, what came out.

    <run_dir>/config.yaml     the resolved config (written at start)
    <run_dir>/meta.json       provenance: ``sources`` = {name: {path, sha256, ...}} of every
                              checkpoint the run reads (pretext: ``checkpoint``, the one it wrote),
                              the stage's own facts (task, data, classes, ...), ``status``
                              running | done; written at start and again at the end
    <run_dir>/metrics.jsonl   one JSON line per logged step / epoch (stages that log)
    <run_dir>/result.json     flat {metric: value}, written atomically and last: its presence
                              means the run is finished (:func:`is_finished`)

Every stage entry point opens its folder with :func:`open_run`: a finished folder returns its
recorded result without recomputing; a folder started with another config (keys other than the
stage's ``free_keys``, e.g. threads / num_workers / device) or from other checkpoints (sha256) is
refused with a :class:`RunFolderError` naming the folder and each changed key (``old -> new``),
and so is resuming an unfinished folder on a machine that resolves the config otherwise (``facts``
of meta.json: pretext's ``precision``), unless ``force=true``, which recomputes (pretext: resumes
from its last checkpoint with the new config). A folder that holds neither a result nor a
checkpoint (a run that failed before producing anything) is restarted with the changed config,
logged. ``result.json`` is never half-written, and a forced rerun keeps the previous result (and
its figures, written through :func:`output_path`) until :func:`finish` replaces them: until then
the new config, meta and figures wait in ``<run_dir>/.pending/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from core.atomic_io import atomic_write_json
from core.checkpoint import CheckpointError, file_sha256, resolve_checkpoint_path
from core.cli import UserError
from core.config import ConfigError, dump_yaml, read_yaml, save_config, to_dict

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "RunFolderError", "TransferError", "is_finished", "read_result"]


class TransferError(UserError):
    """Bad input to a transfer / eval run (dataset, classes); the message names the file."""


class RunFolderError(ConfigError, TransferError):
    """A run folder started with another config or from other checkpoints (and no force=true)."""


# ---- finished or not ----------------------------------------------------------------------------


def is_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished run (its ``result.json`` exists)."""
    return (Path(run_dir) / "result.json").is_file()


def holds_output(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a result or a checkpoint (``*.pt`` / ``*.pth`` anywhere in it)."""
    run_dir = Path(run_dir)
    if is_finished(run_dir):
        return True
    return any(p.is_file() for pattern in ("*.pt", "*.pth") for p in run_dir.rglob(pattern))


def pending_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ".pending"


def output_path(run_dir: str | Path, name: str) -> Path:
    """Where a stage writes its output file ``name`` (a figure, a JSON beside result.json): in
    the folder, or in ``.pending/`` while a previous result is kept (moved in by :func:`finish`)."""
    run_dir = Path(run_dir)
    if not is_finished(run_dir):
        return run_dir / name
    pending_dir(run_dir).mkdir(exist_ok=True)
    return pending_dir(run_dir) / name


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The recorded result of a finished run folder, None for an unfinished one."""
    path = Path(run_dir) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---- provenance -------------------------------------------------------------------------------


def provenance(checkpoint: str | Path) -> dict[str, str]:
    """{path, sha256} of a checkpoint file (a run folder -> its last.pt): what pretext records of
    the one it writes; a stage that reads a pretext checkpoint records ``Pretrained.source``."""
    path = resolve_checkpoint_path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    return {"path": str(path), "sha256": file_sha256(path)}


# ---- config comparison -------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    free_keys: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    legacy: Mapping[str, Any] | None = None,
    renamed: Mapping[str, str] | None = None,
) -> list[str]:
    """``["key: old -> new", ...]`` (dotted keys, sorted) between a saved and a current config.

    ``free_keys`` (dotted) may differ. A key absent from ``saved`` (added to the stage after the
    run started) is no change while ``current`` has its value in ``defaults`` -- unless ``legacy``
    says what a run of that time did instead (``{"mask.overlap_loss": "on"}``). ``renamed``:
    {old key: new key} of keys that moved (a saved old key is compared as the new one).
    """
    saved, current = flatten(saved), flatten(current)
    for old_key, new_key in (renamed or {}).items():
        if old_key in saved:
            saved.setdefault(new_key, saved.pop(old_key))
    defaults = flatten(defaults or {})
    sections = {k.split(".")[0] for k in saved}
    for key, value in (legacy or {}).items():
        if key.split(".")[0] in sections:
            saved.setdefault(key, value)
    changed = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new or key in free_keys:
            continue
        if key not in saved and key in defaults and new == defaults[key]:
            continue
        changed.append(f"{key}: {old!r} -> {new!r}")
    return changed


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_sources(meta: Mapping[str, Any]) -> dict[str, Any]:
    """{name: {path, sha256, ...}} of a meta.json (older transfer folders: ``source`` alone)."""
    if "sources" in meta:
        return dict(meta["sources"])
    return {"checkpoint": meta["source"]} if "source" in meta else {}


def check_unchanged(
    run_dir: str | Path,
    cfg: Any,
    free_keys: Collection[str],
    sources: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Any = None,
    legacy: Mapping[str, Any] | None = None,
    renamed: Mapping[str, str] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`RunFolderError` if ``run_dir`` was started with another config (keys outside
    ``free_keys``) or from checkpoints of another sha256 than ``sources``, or if an unfinished
    ``run_dir`` recorded other ``facts`` in its meta.json (what this machine resolves the config to,
    e.g. ``precision``: a resumption must not change it; a finished folder keeps its record);
    nothing with force=true.

    ``defaults``: the stage's default config (``type(cfg)()`` if None), see :func:`config_changes`.
    """
    if getattr(cfg, "force", False):
        return
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    problems = []
    if config_path.exists():
        default = to_dict(defaults if defaults is not None else type(cfg)())
        problems += config_changes(
            read_yaml(config_path), to_dict(cfg), free_keys, default, legacy, renamed
        )
    meta = read_meta(run_dir)
    if not is_finished(run_dir):  # a fact absent from meta.json (an older folder): no change
        changed = {k: v for k, v in (facts or {}).items() if k in meta and meta[k] != v}
        problems += [f"{k} on this machine: {meta[k]!r} -> {v!r}" for k, v in changed.items()]
    old_sources = recorded_sources(meta)
    for name, source in (sources or {}).items():
        old = old_sources.get(name, {}).get("sha256")
        if old and old != source["sha256"]:
            problems.append(
                f"checkpoint {name}: sha256 {old[:12]}.. -> {source['sha256'][:12]}.. "
                f"({source['path']}, another checkpoint)"
            )
    if problems and not holds_output(run_dir):
        log.warning(
            "%s: restarting with a changed config (%s): the folder holds no result or checkpoint",
            run_dir, ", ".join(problems),
        )  # fmt: skip
        return
    if problems:
        raise RunFolderError(
            f"{run_dir}: the run folder was started with a different config "
            f"({', '.join(problems)}); use another run_dir, or force=true to recompute"
        )


def open_run(
    run_dir: str | Path,
    cfg: Any,
    free_keys: Collection[str],
    sources: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Any = None,
    legacy: Mapping[str, Any] | None = None,
    renamed: Mapping[str, str] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """:func:`check_unchanged`, then the recorded result of a finished folder (None when it is
    fresh or unfinished, or with force=true: the caller computes)."""
    check_unchanged(run_dir, cfg, free_keys, sources, defaults, legacy, renamed, facts)
    if is_finished(run_dir) and not getattr(cfg, "force", False):
        log.info("%s is finished; returning its recorded result", run_dir)
        return read_result(run_dir)
    return None


# ---- writing ------------------------------------------------------------------------------------


def start(
    run_dir: str | Path,
    cfg: Any,
    meta: dict[str, Any],
    sources: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write the resolved config and the provenance (before any work). A previous result
    (force=true) stays until :func:`finish` replaces it: the new config and meta wait in
    ``.pending/`` meanwhile, so the folder's config.yaml always describes its result.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(pending_dir(run_dir), ignore_errors=True)  # what a failed forced rerun left
    where = output_path(run_dir, "")
    save_config(cfg, where / "config.yaml")
    meta.setdefault("sources", dict(sources or {}))
    atomic_write_json(where / "meta.json", {**meta, "status": "running"})
    log.debug("run %s\n%s", run_dir, dump_yaml(cfg))


def finish(run_dir: str | Path, result: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Check the metrics are numbers (finite or nan; strings pass as they are), then write
    meta.json and result.json (last)."""
    run_dir = Path(run_dir)
    clean: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, str):
            clean[key] = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"result[{key!r}] = {value!r} is not a number")
        else:
            clean[key] = float(value)
    bad = [k for k, v in clean.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("%s: non-finite metrics %s", run_dir, bad)
    pending = pending_dir(run_dir)
    if pending.is_dir():  # a forced rerun: its config and figures replace the previous ones
        for path in sorted(pending.iterdir()):
            if path.name != "meta.json":
                os.replace(path, run_dir / path.name)
        shutil.rmtree(pending, ignore_errors=True)
    atomic_write_json(run_dir / "meta.json", {**meta, "status": "done"})
    atomic_write_json(run_dir / "result.json", clean)
    return clean


def resumable_part(path: str | Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict:
    """A finished part of a run (``{"key": key, ...}`` at ``path``, e.g. one layer), or
    ``compute()`` saved there atomically: a killed run resumes at the first unfinished part, and a
    part computed under another ``key`` (protocol, layer, pooling) is recomputed."""
    path = Path(path)
    part = json.loads(path.read_text()) if path.exists() else {}
    if part.get("key") != key:
        part = {"key": key, **compute()}
        atomic_write_json(path, part)
    return part
