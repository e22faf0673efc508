"""Result tables built from recorded runs (pandas): the paper's Table 1 and Table 2.

Every run folder written by :mod:`eval.pipeline` (local or SLURM executor) has a ``run.json`` that says
what it is (stage, task, variant, seed, the command) and, once finished, a ``result.json`` with its
flat metrics; a run that crashed has ``status: failed`` in ``run.json``. Tables are pure functions of
those records, so every cell can be traced back to its run folders (``runs`` column of the long
CSV).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from core.atomic_io import atomic_write_text


@dataclass(frozen=True)
class Column:
    """One table column: ``metric`` of the runs of ``stage``/``task``, times ``scale``."""

    title: str
    stage: str
    task: str
    metric: str
    scale: float = 1.0
    digits: int = 1
    compare: bool = True  # show the difference to the baseline row (build_table's ``baseline``)


# Table 2 (§5.2): transfer to VOC classification / detection / segmentation + pretraining time,
# and the frozen-feature protocols of eval/frozen.py (VOC07 SVM on the layer chosen by
# cross-validation, weighted kNN).
TABLE2_COLUMNS = (
    Column("Classification (VOC07 mAP %)", "transfer", "classify", "mAP", 100.0),
    Column("Frozen SVM, best layer (VOC07 mAP %)", "eval", "frozen", "svm_best_mAP", 100.0),
    Column("Frozen kNN (VOC07 mAP %)", "eval", "frozen", "knn_mAP", 100.0),
    Column("Detection (VOC07 mAP %)", "transfer", "detect", "mAP", 100.0),
    Column("Segmentation (VOC12 mIoU %)", "transfer", "segment", "mIoU", 100.0),
    Column("Pretraining time (min)", "pretext", "pretext", "train_time_s", 1 / 60, 2, False),
)

# Frozen VOC07 SVM per layer (eval/frozen.py), the plot of Zhang et al. 2017 as a table.
FROZEN_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck")
FROZEN_LAYER_COLUMNS = tuple(
    Column(f"{layer} (VOC07 mAP %)", "eval", "frozen", f"svm_{layer}_mAP", 100.0)
    for layer in FROZEN_LAYERS
)


# Low-shot VOC07 SVM on the layer chosen by cross-validation (eval/frozen.py, Goyal et al. 2019):
# test mAP with k positives per class, each run's value the mean over its independent samples.
def lowshot_columns(runs: pd.DataFrame) -> tuple[Column, ...]:
    """One column per k the frozen runs recorded (``lowshot_k<k>_mAP``, ``lowshot.k``), by k."""
    found = (re.fullmatch(r"m\.lowshot_k(\d+)_mAP", name) for name in runs.columns)
    ks = sorted(int(m.group(1)) for m in found if m)
    return tuple(
        Column(f"k={k} (VOC07 mAP %)", "eval", "frozen", f"lowshot_k{k}_mAP", 100.0) for k in ks
    )


# Table 1 (§5.1): inpainting on held-out images, central masks.
# Main columns: the hole's pixels, PSNR averaged per image (paper-comparable, eval/inpainting_bench.py);
# then the whole central S/2 square (overlap band included) and the pooled-L2 PSNR of the hole.
TABLE1_COLUMNS = (
    Column("Hole: mean L1 (%)", "eval", "inpainting", "l1", 100.0, 2),
    Column("Hole: mean L2 (%)", "eval", "inpainting", "l2", 100.0, 2),
    Column("Hole: PSNR (dB)", "eval", "inpainting", "psnr", 1.0, 2),
    Column("Hole: PSNR of pooled L2 (dB)", "eval", "inpainting", "psnr_pooled_hole", 1.0, 2),
    Column("Centre: mean L1 (%)", "eval", "inpainting", "l1_center", 100.0, 2),
    Column("Centre: mean L2 (%)", "eval", "inpainting", "l2_center", 100.0, 2),
    Column("Centre: PSNR (dB)", "eval", "inpainting", "psnr_center", 1.0, 2),
)


# Nearest-neighbour retrieval of pool5 features (val queries against the train set).
RETRIEVAL_COLUMNS = (
    Column("Precision@1 (%)", "eval", "retrieval", "precision@1", 100.0),
    Column("Precision@5 (%)", "eval", "retrieval", "precision@5", 100.0),
    Column("Precision@10 (%)", "eval", "retrieval", "precision@10", 100.0),
    Column("IVF recall@10 vs exact (%)", "eval", "retrieval", "ivf/recall@10", 100.0),
    Column("HNSW recall@10 vs exact (%)", "eval", "retrieval", "hnsw/recall@10", 100.0),
)


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root`` (any depth): identity, status, metrics (``m.<key>``)."""
    rows = []
    for run_json in sorted(Path(root).rglob("run.json")):
        run_dir = run_json.parent
        try:
            info = json.loads(run_json.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{run_json}: not valid JSON ({err})") from err
        row = {
            "stage": info["stage"],
            "task": info.get("task", info["stage"]),
            "variant": info["variant"],
            "seed": info.get("seed", 0),
            "run_dir": str(run_dir),
            "status": info.get("status", "pending"),
        }
        result = run_dir / "result.json"
        if result.exists():
            row["status"] = "done"
            for key, value in json.loads(result.read_text()).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"m.{key}"] = float(value)
        rows.append(row)
    columns = ["stage", "task", "variant", "seed", "run_dir", "status"]
    return pd.DataFrame(rows, columns=columns if not rows else None)


def format_cell(values: list[float], digits: int, expected: int) -> str:
    """``mean ± std (n=k)``; sample std (ddof=1); missing or failed runs shown as ``k/expected``."""
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    else:
        text = f"{mean:.{digits}f}"
    n = f"n={len(values)}" if len(values) == expected else f"n={len(values)}/{expected}"
    return f"{text} ({n})"


@dataclass(frozen=True)
class Difference:
    """mean(row) - mean(baseline) with a ``level`` t-interval [low, high] over seeds.

    ``test``: ``paired`` (t over the per-seed differences, both rows have the same seeds),
    ``welch`` (Welch's unequal-variance t) or ``none`` (too few runs for an interval: low = high =
    NaN).
    """

    diff: float
    low: float
    high: float
    test: str
    n: int  # pairs (paired) or runs of the row (welch / none)

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0


def difference_ci(
    values: dict[int, float], baseline: dict[int, float], level: float = 0.95
) -> Difference | None:
    """Difference of a row's runs to the baseline's runs ({seed: value}), with its t-interval.

    Paired by seed when both have the same seeds (n >= 2): d_s = values[s] - baseline[s],
    mean(d) +- t_{n-1} sd(d) / sqrt(n). Otherwise Welch: se = sqrt(s1^2/n1 + s2^2/n2), degrees of
    freedom by Welch-Satterthwaite (both need n >= 2). None when either side has no run.
    """
    if not values or not baseline:
        return None
    a, b = np.array(list(values.values())), np.array(list(baseline.values()))
    diff = float(a.mean() - b.mean())
    q = (1 + level) / 2
    if set(values) == set(baseline) and len(values) >= 2:
        seeds = sorted(values)
        d = np.array([values[s] - baseline[s] for s in seeds])
        half = float(stats.t.ppf(q, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        return Difference(diff, diff - half, diff + half, "paired", len(d))
    if len(a) >= 2 and len(b) >= 2:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = float(np.sqrt(va + vb))
        if se == 0:
            return Difference(diff, diff, diff, "welch", len(a))
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        half = float(stats.t.ppf(q, dof) * se)
        return Difference(diff, diff - half, diff + half, "welch", len(a))
    return Difference(diff, float("nan"), float("nan"), "none", len(a))


def format_difference(d: Difference, digits: int) -> str:
    """``Δ +5.1 [+1.2, +9.0]*`` (``*``: the interval excludes 0); ``Δ +5.1`` without an interval."""
    text = f"Δ {d.diff:+.{digits}f}"
    if d.test == "none":
        return text
    return text + f" [{d.low:+.{digits}f}, {d.high:+.{digits}f}]" + ("*" if d.significant else "")


def _cell_runs(
    runs: pd.DataFrame, col: Column, variant: str, prefix: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, float]]:
    """(recorded runs of the cell, finished ones with the metric, {seed: scaled value})."""
    sel = runs[
        (runs["stage"] == col.stage) & (runs["task"] == col.task) & (runs["variant"] == variant)
    ]
    key = f"m.{prefix}{col.metric}"
    done = sel[sel["status"] == "done"]
    done = done[done[key].notna()] if key in done.columns else done.iloc[0:0]
    if not len(done):
        return sel, done, {}
    values = {int(s): float(v) * col.scale for s, v in zip(done["seed"], done[key])}
    return sel, done, values


def build_table(
    runs: pd.DataFrame,
    columns: tuple[Column, ...],
    rows: list[tuple[str, ...]],
    baseline: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table, long table). ``rows``: (row title, variant name[, metric prefix]) in display
    order; a row reads metric ``<prefix><column metric>`` (e.g. ``telea/psnr`` for Table 1, where one
    run scores every method).

    ``baseline`` (a variant of ``rows``, e.g. ``random_init``): every other row's cell of a
    ``compare`` column also shows its difference to the baseline with a 95% interval over seeds
    (:func:`difference_ci`), marked ``*`` when the interval excludes zero.

    The long table has one line per (row, column) with mean, std, n, the expected number of runs
    (runs recorded for that cell, whatever their status), the run folders used and, against the
    baseline, ``diff``, ``ci_low``, ``ci_high``, ``test`` (paired / welch / none), ``significant``.
    """
    base_prefix = {r[1]: (r[2] if len(r) > 2 else "") for r in rows}
    display, long = [], []
    for title, variant, *prefix in rows:
        line = {"Method": title}
        for col in columns:
            sel, done, by_seed = _cell_runs(runs, col, variant, prefix[0] if prefix else "")
            values = list(by_seed.values())
            line[col.title] = format_cell(values, col.digits, expected=len(sel))
            record = {
                "row": title,
                "column": col.title,
                "mean": sum(values) / len(values) if values else float("nan"),
                "std": pd.Series(values).std() if len(values) > 1 else float("nan"),
                "n": len(values),
                "expected": len(sel),
                "failed": int((sel["status"] == "failed").sum()),
                "runs": ";".join(done["run_dir"]) if len(done) else "",
            }
            if baseline is not None and col.compare and variant != baseline:
                base = _cell_runs(runs, col, baseline, base_prefix.get(baseline, ""))[2]
                d = difference_ci(by_seed, base)
                if d is not None:
                    line[col.title] += f"; {format_difference(d, col.digits)}"
                    record.update(diff=d.diff, ci_low=d.low, ci_high=d.high, test=d.test,
                                  significant=d.significant)  # fmt: skip
            long.append(record)
        display.append(line)
    return pd.DataFrame(display), pd.DataFrame(long)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_table(
    df: pd.DataFrame, long: pd.DataFrame, out_dir: str | Path, name: str, title: str
) -> None:
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / f"{name}.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / f"{name}_runs.csv", long.to_csv(index=False))
    atomic_write_text(out_dir / f"{name}.md", f"## {title}\n\n" + to_markdown(df))
