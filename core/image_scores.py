"""Per-image test scores of a run, beside its ``result.json``: ``<run_dir>/scores.npz``.

What a VOC07 classification protocol (``eval.frozen``, ``transfer.classify``) scored on each test
image, so that a table can resample the test images and recompute every AP exactly
(``orchestrate.tables.ImageBootstrap``). Arrays:

    ids             [N] str     test image ids, in row order
    labels          [N, C]      1 = class present
    difficult_only  [N, C]      1 = present only as difficult objects (out of class c's ranking)
    ap_mode         [] str      core.voc_ap mode ('11points' or 'area')
    <metric>        [N, C]      float64 scores behind ``result.json[<metric>]`` (e.g.
                                ``svm_conv5_mAP``): :func:`voc07_map` of them reproduces it

Written atomically before ``result.json`` (which is written last), so a finished run folder has
either its complete file or none (runs recorded before this file existed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from core.atomic_io import atomic_save
from core.voc_ap import mean_ap, voc07_classification_ap

FILE = "scores.npz"
META_KEYS = ("ids", "labels", "difficult_only", "ap_mode")


def save(
    run_dir: str | Path,
    ids: Sequence[str],
    labels: np.ndarray,
    difficult_only: np.ndarray,
    ap_mode: str,
    scores: Mapping[str, np.ndarray],
) -> None:
    """Write ``<run_dir>/scores.npz`` atomically; every score array must be [N, C]."""
    labels = np.asarray(labels, np.float32)
    arrays = {key: np.asarray(value, np.float64) for key, value in scores.items()}
    for key, value in arrays.items():
        if value.shape != labels.shape or key in META_KEYS:
            raise ValueError(f"scores[{key!r}]: shape {value.shape}, labels {labels.shape}")
    arrays.update(ids=np.asarray(list(ids), dtype=str), labels=labels, ap_mode=np.asarray(ap_mode),
                  difficult_only=np.asarray(difficult_only, np.float32))  # fmt: skip
    atomic_save(Path(run_dir) / FILE, lambda fh: np.savez(fh, **arrays))


def load(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of ``<run_dir>/scores.npz``, None when the run recorded none."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def voc07_map(
    scores: np.ndarray, labels: np.ndarray, difficult_only: np.ndarray, ap_mode: str
) -> float:
    """VOC07 mAP as the protocols compute it: a class whose scores are all NaN (no classifier was
    trained, eval.frozen) or that has no positive among the rows has no AP and is left out."""
    untrained = np.isnan(scores).all(0)
    per_class = voc07_classification_ap(np.where(untrained, 0.0, scores), labels, difficult_only,
                                        ap_mode)  # fmt: skip
    per_class[untrained] = np.nan
    return mean_ap(per_class)


def resampled_maps(arrays: Mapping[str, np.ndarray], metric: str, index: np.ndarray) -> np.ndarray:
    """VOC07 mAP of ``arrays[metric]`` on each resample of the test images: [B].

    ``index`` [B, M]: row b lists the test rows of resample b (with repeats, a bootstrap draw);
    every AP is recomputed on it, class by class, as :func:`voc07_map` would on those rows
    (11-point AP vectorised over the resamples; ``area`` through core.voc_ap row by row).
    """
    scores, labels = arrays[metric], arrays["labels"] > 0.5
    keep, mode = arrays["difficult_only"] == 0, str(arrays["ap_mode"])
    if mode != "11points":
        return np.array([voc07_map(scores[r], labels[r], 1 - keep[r], mode) for r in index])
    per_class = np.full((len(index), scores.shape[1]), np.nan)
    for c in range(scores.shape[1]):
        if np.isnan(scores[:, c]).all():  # no classifier for c: no AP, as in voc07_map
            continue
        # a difficult-only entry ranked last, as a negative, changes no 11-point precision maximum:
        # it comes after every positive, where precision only falls
        s = np.where(keep[index, c], scores[index, c], -np.inf)
        pos = labels[index, c] & keep[index, c]
        order = np.argsort(-s, axis=1, kind="stable")
        tp = np.cumsum(np.take_along_axis(pos, order, axis=1), axis=1)
        npos = tp[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tp / npos
        precision = tp / np.arange(1, index.shape[1] + 1)
        ap = np.zeros(len(index))
        for t in np.linspace(0, 1, 11):  # as core.voc_ap.average_precision, term by term
            best = np.where(recall >= t - 1e-12, precision, -np.inf).max(axis=1)
            ap += np.where(np.isfinite(best), best, 0.0) / 11
        per_class[:, c] = np.where(npos[:, 0] > 0, ap, np.nan)
    valid = (~np.isnan(per_class)).sum(axis=1)  # mean over the classes that have an AP
    with np.errstate(invalid="ignore"):
        return np.where(valid > 0, np.nansum(per_class, axis=1) / valid, np.nan)
