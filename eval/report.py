"""Write ``results/``: Table 1 and Table 2 (CSV + Markdown), figures, and how they were made.

Everything here is read from run folders (``run.json`` + ``result.json`` + ``metrics.jsonl``), so
the committed tables are the output of the recorded runs; ``*_runs.csv`` traces each cell to them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from core.atomic_io import atomic_save, atomic_write_text, read_jsonl
from core.jobs import Profile, expand
from core.machine import cpu_model
from eval.tables import (
    FROZEN_LAYER_COLUMNS,
    FROZEN_LAYERS,
    RETRIEVAL_COLUMNS,
    TABLE1_COLUMNS,
    TABLE2_COLUMNS,
    build_table,
    collect_runs,
    lowshot_columns,
    to_markdown,
    write_table,
)

PACKAGES = (
    "torch",
    "torchvision",
    "mmcv",
    "mmdet",
    "mmsegmentation",
    "mmengine",
    "faiss-cpu",
    "scikit-learn",
    "pandas",
    "numpy",
)


def table2_rows(profile: Profile) -> list[tuple[str, str]]:
    return [(spec.get("title", name), name) for name, spec in profile.pretext["variants"].items()]


BASELINE = "random_init"  # the row every other Table 2 / frozen-layer row is compared with


def baseline_variant(profile: Profile) -> str | None:
    return BASELINE if BASELINE in profile.pretext["variants"] else None


def frozen_rows(profile: Profile) -> list[tuple[str, str]]:
    """Table 2 rows that have frozen-feature runs (eval stage ``frozen``)."""
    variants = profile.eval.get("frozen", {}).get("variants", [])
    return [(title, name) for title, name in table2_rows(profile) if name in variants]


def frozen_svm_figure(runs: pd.DataFrame, rows: list[tuple[str, str]], path: Path) -> bool:
    """Frozen VOC07 SVM test mAP against layer, one line per method, error bars = sample std over
    seeds (the layer plot of Zhang et al. 2017). False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frozen = runs[
        (runs["stage"] == "eval") & (runs["task"] == "frozen") & (runs["status"] == "done")
    ]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plotted = False
    x = list(range(1, len(FROZEN_LAYERS) + 1))
    for title, variant in rows:
        sel = frozen[frozen["variant"] == variant]
        means, stds = [], []
        for layer in FROZEN_LAYERS:
            key = f"m.svm_{layer}_mAP"
            vals = 100 * sel[key].dropna() if key in sel.columns else pd.Series(dtype=float)
            means.append(vals.mean() if len(vals) else float("nan"))
            stds.append(vals.std() if len(vals) > 1 else 0.0)
        if all(pd.isna(m) for m in means):
            continue
        n = len(sel)
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, lw=1.5, label=f"{title} (n={n})")
        plotted = True
    if plotted:
        ax.set_xticks(x, list(FROZEN_LAYERS))
        ax.set_xlabel("layer (average-pooled to ~9k d; bottleneck flattened)")
        ax.set_ylabel("VOC07 test mAP (%), linear SVM")
        ax.set_title("Frozen features: linear SVM per layer (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return plotted


def table1_rows(profile: Profile) -> list[tuple[str, str]]:
    rows = profile.eval.get("inpainting", {}).get("rows", {})
    return [(title, "all", f"{method}/") for method, title in rows.items()]


def training_curves(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pretext = runs[(runs["stage"] == "pretext") & (runs["status"] == "done")]
    for (variant, seed), sel in pretext.groupby(["variant", "seed"]):
        records = read_jsonl(Path(sel["run_dir"].iloc[0]) / "metrics.jsonl")
        records = [r for r in records if "loss_rec" in r]  # supervised runs have no such loss
        if records:
            ax.plot(
                [r["step"] for r in records],
                [r["loss_rec"] for r in records],
                label=f"{variant} s{seed}",
                lw=1,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction loss (masked L2)")
    ax.set_yscale("log")
    ax.set_title("Pretext training curves")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_figure(src: Path, dst: Path) -> bool:
    if not src.exists():
        return False
    atomic_save(dst, lambda fh: fh.write(src.read_bytes()))
    return True


def make_wall_line() -> list[str]:
    """`make table` exports CE_TABLE_START (epoch seconds, before its set-up step): the wall time
    of the whole command, set-up included."""
    start = os.environ.get("CE_TABLE_START", "")
    if not start.isdigit():
        return []
    minutes = (time.time() - int(start)) / 60
    return [f"- `make table` wall time (set-up, data generation and pipeline): {minutes:.1f} min"]


def write_report(profile: Profile, pipeline_wall_s: float, command: str) -> Path:
    out = Path(profile.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    # only this profile's run folders: another profile may share its runs root (PROFILE=ablation)
    runs = collect_runs(profile.runs_root)
    if not runs.empty:
        runs = runs[runs["run_dir"].isin({str(Path(j.run_dir)) for j in expand(profile)})]
    sections = []
    baseline = baseline_variant(profile)
    t2, t2_long = build_table(runs, TABLE2_COLUMNS, table2_rows(profile), baseline)
    write_table(t2, t2_long, out, "table2_transfer", "Table 2: transfer from pretext features")
    sections.append(("Table 2: feature learning, transfer to PASCAL VOC", t2))
    if frozen_rows(profile):
        tf, tf_long = build_table(runs, FROZEN_LAYER_COLUMNS, frozen_rows(profile), baseline)
        write_table(
            tf, tf_long, out, "frozen_layers", "Frozen features: VOC07 linear SVM per layer"
        )
        sections.append(("Frozen features: VOC07 linear SVM test mAP per layer", tf))
        if lowshot := lowshot_columns(runs):
            title = "Frozen features: low-shot VOC07 SVM, k positives per class"
            tl, tl_long = build_table(runs, lowshot, frozen_rows(profile), baseline)
            write_table(tl, tl_long, out, "frozen_lowshot", title)
            sections.append((f"{title} (layer chosen by cross-validation)", tl))
    if table1_rows(profile):
        t1, t1_long = build_table(runs, TABLE1_COLUMNS, table1_rows(profile))
        write_table(t1, t1_long, out, "table1_inpainting", "Table 1: inpainting, central masks")
        sections.insert(0, ("Table 1: semantic inpainting on held-out images (central masks)", t1))
    retrieval = [
        (title, "all", f"{name}/pool5/")
        for name, title in profile.eval.get("retrieval", {}).get("rows", {}).items()
    ]
    if retrieval:
        t3, t3_long = build_table(runs, RETRIEVAL_COLUMNS, retrieval)
        write_table(t3, t3_long, out, "retrieval", "Nearest-neighbour retrieval (FAISS, pool5)")
        chance = runs[(runs["stage"] == "eval") & (runs["task"] == "retrieval")]
        note = ""
        if "m.chance/precision" in chance.columns and chance["m.chance/precision"].notna().any():
            note = (
                f" (chance precision: {100 * chance['m.chance/precision'].dropna().iloc[0]:.1f}%)"
            )
        sections.append(
            (f"Nearest-neighbour retrieval: a neighbour shares an object class{note}", t3)
        )
    figures = out / "figures"
    training_curves(runs, figures / "training_curves.png")
    frozen_svm_figure(runs, frozen_rows(profile), figures / "frozen_svm_layers.png")
    for name, rel in profile.eval.get("figures", {}).items():
        copy_figure(Path(rel), figures / name)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))

    lines = [f"# Results: profile `{profile.name}`", ""]
    for title, df in sections:
        lines += [f"## {title}", "", to_markdown(df)]
    lines += [
        "Cells: mean ± sample std over seeds (n = finished runs; `n=k/m` when some of the m recorded "
        "runs are missing or failed). Each cell's run folders are listed in the matching `*_runs.csv`.",
        "",
        "Δ: difference to Random initialization with its 95% t-interval over seeds, paired by seed "
        "when both rows have the same seeds, Welch otherwise (no interval with one run); `*` marks "
        "intervals that exclude 0. Frozen SVM / kNN: `eval/frozen.py` (VOC07 linear SVM on the "
        "layer chosen by 3-fold cross-validation on trainval; kNN k=20, T=0.07 on the layer chosen "
        "by leave-one-out on trainval); per layer in `frozen_layers.md`, "
        "`figures/frozen_svm_layers.png`. Low-shot: SVMs on k positives and (C − 1) k negatives per class "
        "drawn from trainval, `lowshot.samples` samples (5 by default; the same for every run), each "
        "cell over the runs' "
        "sample means; the cost is chosen by cross-validation on the sample (C = 1 at k = 1).",
        "",
        "## Provenance",
        "",
        f"- command: `{command}` (profile file `{profile.path}`)",
        f"- date (UTC): {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- git commit: {git_commit()}",
        f"- machine: {cpu_model()}, {platform.machine()}, {platform.system()}, "
        f"{shutil.os.cpu_count()} CPUs",
        f"- pipeline wall time of this invocation: {pipeline_wall_s / 60:.1f} min (jobs already done were skipped)",
        *make_wall_line(),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
    ]
    atomic_write_text(out / "README.md", "\n".join(lines))
    return out
