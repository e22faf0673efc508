"""Write ``results/``: Table 1 and Table 2 (CSV + Markdown), figures, and how they were made.

Everything here is read from run folders (``run.json`` + ``result.json`` + ``metrics.jsonl``), so
the committed tables are the output of the recorded runs; ``*_runs.csv`` traces each cell to them.
The tables alone can be re-rendered from a ``runs.csv`` without the run folders (``python -m
orchestrate.report --profile builtin --runs-csv results/runs.csv``): every cell, interval and
resolution line comes from the recorded metrics; only the test-image intervals need the folders'
scores.
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
from core.cli import ArgumentParser, run_cli
from core.features import LAYERS
from core.machine import cpu_model
from orchestrate.budget import write_budget
from orchestrate.jobs import expand, run_dir_for
from orchestrate.precision import write_precision
from orchestrate.profile import Profile, load_profile, profile_path
from orchestrate.tables import (
    FROZEN_LAYER_COLUMNS,
    RETRIEVAL_COLUMNS,
    SINGLE_LABEL_COLUMNS,
    SINGLE_LABEL_LAYER_COLUMNS,
    TABLE1_COLUMNS,
    TABLE2_COLUMNS,
    ImageBootstrap,
    build_table,
    collect_runs,
    lowshot_columns,
    read_run_list,
    resolution_markdown,
    resolution_table,
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
    return [(spec.title or name, name) for name, spec in profile.pretext.variants.items()]


BASELINE = "random_init"  # the row every other Table 2 / frozen-layer row is compared with
UPPER_BOUND = "supervised"  # the labelled upper bound: not one of the self-supervised rows
BOOTSTRAP_RESAMPLES = 1000  # test-image resamples (variance of a mean: ~4.5% relative error)
HALF_WIDTH_TARGET = 2.0  # points: the seeds a ±2-point interval would take


def baseline_variant(profile: Profile) -> str | None:
    return BASELINE if BASELINE in profile.pretext.variants else None


def self_supervised(rows: list[tuple[str, ...]], baseline: str | None) -> list[str]:
    """The variants whose resolution a table states: every row but the baseline and the upper
    bound (their differences to the baseline are pooled, orchestrate.tables.resolution_table)."""
    return [r[1] for r in rows if r[1] not in (baseline, UPPER_BOUND)]


def task_rows(profile: Profile, task: str) -> list[tuple[str, str]]:
    """Table 2 rows that have runs of the eval task ``task``."""
    variants = profile.eval[task].variants if task in profile.eval else []
    return [(title, name) for title, name in table2_rows(profile) if name in variants]


def frozen_rows(profile: Profile) -> list[tuple[str, str]]:
    """Table 2 rows that have frozen-feature runs (eval stage ``frozen``)."""
    return task_rows(profile, "frozen")


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
    x = list(range(1, len(LAYERS) + 1))
    for title, variant in rows:
        sel = frozen[frozen["variant"] == variant]
        means, stds = [], []
        for layer in LAYERS:
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
        ax.set_xticks(x, list(LAYERS))
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
    rows = profile.eval["inpainting"].rows if "inpainting" in profile.eval else {}
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


def precision_line(runs: pd.DataFrame) -> list[str]:
    """What the trained runs recorded as their precision (core.machine.resolve_amp; the
    ``precision`` column of :func:`orchestrate.tables.collect_runs`), counted per task."""
    if runs.empty or "precision" not in runs or runs["precision"].isna().all():
        return []
    counts = runs.dropna(subset=["precision"]).groupby(["task", "precision"]).size()
    text = "; ".join(f"{task} {prec} x {n}" for (task, prec), n in counts.items())
    return [f"- precision the runs trained in (their meta.json): {text} (docs/precision.md)"]


def make_wall_line() -> list[str]:
    """`make table` exports CE_TABLE_START (epoch seconds, before its set-up step): the wall time
    of the whole command, set-up included."""
    start = os.environ.get("CE_TABLE_START", "")
    if not start.isdigit():
        return []
    minutes = (time.time() - int(start)) / 60
    return [f"- `make table` wall time (set-up, data generation and pipeline): {minutes:.1f} min"]


def write_tables(
    runs: pd.DataFrame, profile: Profile, out: Path, bootstrap: ImageBootstrap | None
) -> list[tuple[str, pd.DataFrame, str]]:
    """Every table of ``profile`` from ``runs`` into ``out``: (title, table, resolution lines).
    ``bootstrap``: the seeds + test images intervals of Table 2 (per layer they would cost ~14 s
    per run and layer at VOC07's 4952 test images)."""
    sections = []
    baseline = baseline_variant(profile)

    def compared(name, columns, rows, file_title, section_title, bootstrap=None):
        table, long = build_table(runs, columns, rows, baseline, bootstrap)
        res = None
        if baseline is not None:
            pooled = self_supervised(rows, baseline)
            res = resolution_table(runs, columns, rows, baseline, pooled, HALF_WIDTH_TARGET)
        write_table(table, long, out, name, file_title, res)
        sections.append((section_title, table, "" if res is None else resolution_markdown(res)))

    compared("table2_transfer", TABLE2_COLUMNS, table2_rows(profile),
             "Table 2: transfer from pretext features",
             "Table 2: feature learning, transfer to PASCAL VOC", bootstrap)  # fmt: skip
    if frozen_rows(profile):
        compared("frozen_layers", FROZEN_LAYER_COLUMNS, frozen_rows(profile),
                 "Frozen features: VOC07 linear SVM per layer",
                 "Frozen features: VOC07 linear SVM test mAP per layer")  # fmt: skip
        if lowshot := lowshot_columns(runs):
            title = "Frozen features: low-shot VOC07 SVM, k positives per class"
            compared("frozen_lowshot", lowshot, frozen_rows(profile), title,
                     f"{title} (layer chosen by cross-validation)")  # fmt: skip
    if rows := task_rows(profile, "single_label"):
        compared("single_label", SINGLE_LABEL_COLUMNS, rows,
                 "Single-label protocols: top-1 / top-5 on val (layer chosen on held-out train)",
                 "Single-label protocols: linear probe and kNN, val top-1 / top-5")  # fmt: skip
        compared("single_label_layers", SINGLE_LABEL_LAYER_COLUMNS, rows,
                 "Single-label linear probe: val top-1 per layer",
                 "Single-label linear probe: val top-1 per layer (Zhang et al. 2017, Table 2)")  # fmt: skip
    if table1_rows(profile):
        t1, t1_long = build_table(runs, TABLE1_COLUMNS, table1_rows(profile))
        write_table(t1, t1_long, out, "table1_inpainting", "Table 1: inpainting, central masks")
        sections.insert(
            0, ("Table 1: semantic inpainting on held-out images (central masks)", t1, "")
        )
    rows = profile.eval["retrieval"].rows if "retrieval" in profile.eval else {}
    retrieval = [(title, "all", f"{name}/pool5/") for name, title in rows.items()]
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
            (f"Nearest-neighbour retrieval: a neighbour shares an object class{note}", t3, "")
        )
    return sections


def table_lines(profile: Profile, sections: list[tuple[str, pd.DataFrame, str]]) -> list[str]:
    """The README's tables and how to read them (everything above its provenance)."""
    lines = [f"# Results: profile `{profile.name}`", ""]
    for title, df, resolution in sections:
        lines += [f"## {title}", "", to_markdown(df)]
        if resolution:
            lines += [resolution]
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
        "Under each compared table, its resolution (`*_resolution.csv`): per column the pooled std "
        "of the self-supervised rows' paired per-seed differences to random init, the smallest "
        "true difference the table's seeds detect (95% two-sided paired t-test, 80% power, exact "
        "noncentral t), the half-width of the 95% interval at those seeds, and the seeds a "
        f"±{HALF_WIDTH_TARGET:g}-point interval would take. A Δ inside the minimum detectable "
        "difference that is not starred is a null of this table, not evidence of no effect.",
        "",
        "`seeds+images [lo, hi]` (Table 2, only where every run of the two rows recorded per-image "
        "test scores, `scores.npz`): a second 95% interval for the same Δ, for new test images as "
        "well as new seeds: the seed interval widened by the test-set variance the seeds share "
        f"({BOOTSTRAP_RESAMPLES} bootstrap resamples of the test images, the same for every method "
        "and seed, each AP recomputed; `orchestrate/tables.py::combined_interval`). It is never narrower "
        "than the seed interval; the interval right after `Δ` is always the seed-only one.",
        "",
    ]
    return lines


def write_report(profile: Profile, pipeline_wall_s: float, command: str) -> Path:
    out = Path(profile.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    # only this profile's run folders: another profile may share its runs root (PROFILE=ablation)
    jobs = expand(profile)
    runs = collect_runs(profile.runs_root)
    if not runs.empty:
        runs = runs[runs["run_dir"].isin({str(Path(j.run_dir)) for j in jobs})]
    sections = write_tables(runs, profile, out, ImageBootstrap(BOOTSTRAP_RESAMPLES))
    figures = out / "figures"
    training_curves(runs, figures / "training_curves.png")
    frozen_svm_figure(runs, frozen_rows(profile), figures / "frozen_svm_layers.png")
    budget = write_budget(runs, profile, out)  # a profile with optim.steps grids (budget.yaml)
    precision = write_precision(runs, profile, out)  # a profile with amp= pairs (precision.yaml)
    for (stage, task), spec in profile.tasks().items():
        for name in spec.figures:  # files the task's one run (per: profile) wrote
            run_dir = run_dir_for(profile.runs_root, stage, task, "all", 0)
            copy_figure(Path(run_dir) / name, figures / name)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))

    lines = [
        *table_lines(profile, sections),
        *budget,
        *precision,
        "## Provenance",
        "",
        f"- command: `{command}` (profile file `{profile.path}`)",
        f"- date (UTC): {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- git commit: {git_commit()}",
        f"- machine: {cpu_model()}, {platform.machine()}, {platform.system()}, "
        f"{shutil.os.cpu_count()} CPUs",
        *precision_line(runs),
        f"- pipeline wall time of this invocation: {pipeline_wall_s / 60:.1f} min (jobs already done were skipped)",
        *make_wall_line(),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
    ]
    atomic_write_text(out / "README.md", "\n".join(lines))
    return out


PROVENANCE = "## Provenance"


def rerender(profile: Profile, runs_csv: Path) -> Path:
    """Re-render the tables of ``profile.results_dir`` from a ``runs.csv`` (what write_report
    wrote from the run folders) without the folders: the same cells, intervals and resolution
    lines; no test-image intervals (they need each folder's scores.npz) and no figures. The README's
    provenance is kept, with a line saying what was re-rendered."""
    runs = read_run_list(runs_csv)
    out = Path(profile.results_dir)
    sections = write_tables(runs, profile, out, bootstrap=None)
    readme = out / "README.md"
    old = readme.read_text() if readme.exists() else ""
    provenance = old[old.index(PROVENANCE) :].rstrip("\n").split("\n") if PROVENANCE in old else [
        PROVENANCE, ""]  # fmt: skip
    note = (f"- tables re-rendered from `{runs_csv}` at commit {git_commit()} "
            "(`python -m orchestrate.report`; no run was re-run, the runs above are unchanged)")  # fmt: skip
    precision = write_precision(runs, profile, out)  # loss curves only where the folders are
    lines = [*table_lines(profile, sections), *precision, *provenance, note, ""]
    atomic_write_text(readme, "\n".join(lines))
    return out


def cli(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=rerender.__doc__)
    parser.add_argument("--profile", default="builtin", help="builtin | paper | a YAML path")
    parser.add_argument("--runs-csv", required=True, type=Path, help="e.g. results/runs.csv")
    args = parser.parse_args(argv)
    out = rerender(load_profile(profile_path(args.profile)), args.runs_csv)
    print(f"tables of {out} re-rendered from {args.runs_csv}")


if __name__ == "__main__":
    run_cli(cli)
