"""Result tables built from recorded runs (pandas): the paper's Table 1 and Table 2.

Every run folder written by :mod:`eval.pipeline` (or a SLURM sweep) has a ``run.json`` that says
what it is (stage, task, variant, seed, the command) and, once finished, a ``result.json`` with its
flat metrics; a run that crashed has ``status: failed`` in ``run.json``. Tables are pure functions of
those records, so every cell can be traced back to its run folders (``runs`` column of the long
CSV).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pretext.atomic_io import atomic_write_text


@dataclass(frozen=True)
class Column:
    """One table column: ``metric`` of the runs of ``stage``/``task``, times ``scale``."""

    title: str
    stage: str
    task: str
    metric: str
    scale: float = 1.0
    digits: int = 1


# Table 2 (§5.2): transfer to VOC classification / detection / segmentation + pretraining time.
TABLE2_COLUMNS = (
    Column("Classification (VOC07 mAP %)", "transfer", "classify", "mAP", 100.0),
    Column(
        "Linear probe, frozen pool5 (VOC07 mAP %)",
        "transfer",
        "classify",
        "linear_pool5_mAP",
        100.0,
    ),
    Column("Detection (VOC07 mAP %)", "transfer", "detect", "mAP", 100.0),
    Column("Segmentation (VOC12 mIoU %)", "transfer", "segment", "mIoU", 100.0),
    Column("Pretraining time (min)", "pretext", "pretext", "train_time_s", 1 / 60, 2),
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


def build_table(
    runs: pd.DataFrame, columns: tuple[Column, ...], rows: list[tuple[str, ...]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table, long table). ``rows``: (row title, variant name[, metric prefix]) in display
    order; a row reads metric ``<prefix><column metric>`` (e.g. ``telea/psnr`` for Table 1, where one
    run scores every method).

    The long table has one line per (row, column) with mean, std, n, the expected number of runs
    (runs recorded for that cell, whatever their status) and the run folders used.
    """
    display, long = [], []
    for title, variant, *prefix in rows:
        line = {"Method": title}
        for col in columns:
            sel = runs[
                (runs["stage"] == col.stage)
                & (runs["task"] == col.task)
                & (runs["variant"] == variant)
            ]
            key = f"m.{prefix[0] if prefix else ''}{col.metric}"
            done = sel[sel["status"] == "done"]
            done = done[done[key].notna()] if key in done.columns else done.iloc[0:0]
            values = [float(v) * col.scale for v in done[key]] if len(done) else []
            line[col.title] = format_cell(values, col.digits, expected=len(sel))
            long.append(
                {
                    "row": title,
                    "column": col.title,
                    "mean": sum(values) / len(values) if values else float("nan"),
                    "std": pd.Series(values).std() if len(values) > 1 else float("nan"),
                    "n": len(values),
                    "expected": len(sel),
                    "failed": int((sel["status"] == "failed").sum()),
                    "runs": ";".join(done["run_dir"]) if len(done) else "",
                }
            )
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
