"""bf16 against fp32, paired by seed (``PROFILE=precision make table``; docs/precision.md).

A profile compares precisions when one of its runs differs from another only by an ``amp=``
setting, which this module finds in the profile itself:

- a pretext variant whose overrides hold ``amp=<x>`` (x not ``off`` / ``auto``) is paired with the
  variant of the same config and the same other overrides (and none of ``amp``): its partner in
  fp32. Compared: the evaluations of the two (frozen SVM best layer and conv5, kNN, fine-tuned
  classification) and the pretext runs themselves (mean loss over the first and the last quarter
  of the logged steps, final loss, train time);
- a transfer / eval task whose args hold ``<key>amp=<x>`` (e.g. ``finetune.amp=bf16``) is paired
  with the task of the same module and the same other args: per pretext variant both run on, the
  task's own metrics (fine-tuned classification: its mAP and time).

Every difference is bf16 − fp32 over the seeds both have, with the paired 95% t-interval of
:func:`orchestrate.tables.difference_ci`. Written: ``precision.csv`` / ``precision.md`` in the
results folder; the Markdown section goes into its README.

The same profile's results folders from several machines (their ``runs.csv``) pool into one
comparison with n = seeds x machines, each (machine, seed) a pair (``precision_pooled.md``); the
loss curves, which need the run folders, are left out:

    python -m orchestrate.precision --profile precision --out results/precision \
        results/precision results/machines/amd_epyc/precision --names "Intel Xeon" "AMD EPYC"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic_io import atomic_write_text, read_jsonl
from core.cli import UserError, run_cli
from orchestrate.profile import Profile, load_profile, profile_path
from orchestrate.tables import difference_ci, format_difference, read_run_list, to_markdown

OFF = ("off", "auto")

# (stage, task, result key, scale, label) compared for a pair of pretext variants.
VARIANT_METRICS = (
    ("eval", "frozen", "svm_best_mAP", 100, "frozen SVM best layer, mAP"),
    ("eval", "frozen", "svm_conv5_mAP", 100, "frozen SVM conv5, mAP"),
    ("eval", "frozen", "knn_mAP", 100, "kNN, mAP"),
    ("transfer", "classify", "finetune_mAP", 100, "fine-tuned classification, mAP"),
    ("pretext", "pretext", "loss_first_quarter", 1, "pretext loss, first quarter"),
    ("pretext", "pretext", "loss_last_quarter", 1, "pretext loss, last quarter"),
    ("pretext", "pretext", "train_time_s", 1 / 60, "pretext train time, min"),
)
# result key, scale, label: compared for a pair of tasks (their own metrics, when recorded).
TASK_METRICS = (
    ("finetune_mAP", 100, "fine-tuned classification, mAP"),
    ("finetune_time_s", 1 / 60, "fine-tuning time, min"),
    ("svm_best_mAP", 100, "frozen SVM best layer, mAP"),
    ("knn_mAP", 100, "kNN, mAP"),
)


def amp_value(items: list[str]) -> tuple[str | None, list[str]]:
    """(the value of the ``amp`` / ``<section>.amp`` setting in ``key=value`` items or None, the
    other items)."""
    value, rest = None, []
    for item in items:
        key, _, val = item.partition("=")
        if key == "amp" or key.endswith(".amp"):
            value = val
        else:
            rest.append(item)
    return value, rest


def variant_pairs(profile: Profile) -> list[tuple[str, str, str]]:
    """(fp32 variant, low-precision variant, its amp value) of the profile's pretext variants."""
    specs = profile.pretext.variants
    plain = {}
    for name, spec in specs.items():
        amp, rest = amp_value(spec.overrides)
        if amp is None or amp in OFF:
            plain.setdefault((spec.config, tuple(rest)), name)
    pairs = []
    for name, spec in specs.items():
        amp, rest = amp_value(spec.overrides)
        partner = plain.get((spec.config, tuple(rest)))
        if amp is not None and amp not in OFF and partner is not None:
            pairs.append((partner, name, amp))
    return pairs


def task_pairs(profile: Profile) -> list[tuple[tuple[str, str], tuple[str, str], str]]:
    """((stage, fp32 task), (stage, low-precision task), amp value) of the profile's tasks."""
    tasks = profile.tasks()
    plain = {}
    for (stage, task), spec in tasks.items():
        amp, rest = amp_value(spec.args)
        if amp is None or amp in OFF:
            plain.setdefault((spec.module, tuple(rest)), (stage, task))
    pairs = []
    for (stage, task), spec in tasks.items():
        amp, rest = amp_value(spec.args)
        partner = plain.get((spec.module, tuple(rest)))
        if amp is not None and amp not in OFF and partner is not None:
            pairs.append((partner, (stage, task), amp))
    return pairs


def loss_quarters(run_dir: str | Path) -> dict[str, float]:
    """Mean logged ``loss`` over the first and the last quarter of a pretext run's metrics lines."""
    losses = [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    if len(losses) < 4:
        return {}
    q = len(losses) // 4
    return {"loss_first_quarter": float(np.mean(losses[:q])),
            "loss_last_quarter": float(np.mean(losses[-q:]))}  # fmt: skip


def with_pretext_precision(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``pretext_precision``: on each row, what the pretext run of its variant and
    seed recorded (an evaluation's precision is that of the run it reads); NaN where none is
    recorded (folders from before the record)."""
    if "precision" not in runs:
        return runs.assign(precision=np.nan, pretext_precision=np.nan)
    pre = runs[runs["stage"] == "pretext"].set_index(["variant", "seed"])["precision"]
    keys = pd.MultiIndex.from_arrays([runs["variant"], runs["seed"]])
    out = runs.copy()  # one block per dtype: collect_runs' frame grows a column at a time
    out["pretext_precision"] = pre.reindex(keys).to_numpy()
    return out


def values(
    runs: pd.DataFrame, stage: str, task: str, variant: str, key: str,
    precision: str | None = None, column: str = "precision", left_out: set | None = None,
) -> dict[int, float]:  # fmt: skip
    """{seed: value} of ``key`` over the finished runs of (stage, task, variant); with
    ``precision``, only those whose ``column`` (``precision``: their own; ``pretext_precision``,
    from :func:`with_pretext_precision`: their pretext run's) records it or nothing: ``amp=auto``
    resolves per machine, so a partner without ``amp`` is fp32 only where its run folder says so.
    The runs left out go into ``left_out`` as (task, variant, seed, recorded)."""
    sel = runs[(runs["stage"] == stage) & (runs["task"] == task) & (runs["variant"] == variant)]
    sel = sel[sel["status"] == "done"]
    if precision is not None:
        got = sel[column]
        keep = got.isna() | (got == precision)
        if left_out is not None:
            what = "pretext" if column == "pretext_precision" else task
            left_out.update(
                (what, variant, int(s), g) for s, g in zip(sel["seed"][~keep], got[~keep])
            )
        sel = sel[keep]
    if key.startswith("loss_"):
        out = {int(r.seed): loss_quarters(r.run_dir).get(key) for r in sel.itertuples()}
        return {s: v for s, v in out.items() if v is not None}
    column = f"m.{key}"
    if column not in sel:
        return {}
    return {int(s): float(v) for s, v in zip(sel["seed"], sel[column]) if pd.notna(v)}


def row(what: str, amp: str, label: str, fp32: dict, low: dict, scale: float) -> dict | None:
    """One compared metric over the seeds both sides have: n, means and stds of both, bf16 − fp32
    with its paired interval."""
    seeds = fp32.keys() & low.keys()
    if not seeds:
        return None
    fp32 = {s: fp32[s] * scale for s in sorted(seeds)}
    low = {s: low[s] * scale for s in sorted(seeds)}
    d = difference_ci(low, fp32)
    std = lambda x: float(np.std(list(x.values()), ddof=1)) if len(x) > 1 else np.nan  # noqa: E731
    return {"compared": what, "amp": amp, "metric": label, "n": d.n, "test": d.test,
            "fp32_mean": float(np.mean(list(fp32.values()))), "fp32_std": std(fp32),
            "low_mean": float(np.mean(list(low.values()))), "low_std": std(low),
            "diff": d.diff, "ci_low": d.low, "ci_high": d.high,
            "excludes_0": bool(d.significant), "cell": format_difference(d, 2)}  # fmt: skip


def precision_table(
    runs: pd.DataFrame, profile: Profile, left_out: set | None = None, losses: bool = True
) -> pd.DataFrame:
    """One line per compared (pair, metric) of ``profile`` in ``runs`` (the loss curves only with
    ``losses``); the runs left out for a recorded precision other than the pair's go into
    ``left_out`` (:func:`values`)."""
    titles = {n: s.title or n for n, s in profile.pretext.variants.items()}
    runs = with_pretext_precision(runs)
    rows = []
    for fp32, low, amp in variant_pairs(profile):
        what = f"pretext: {titles[low]} vs {titles[fp32]}"
        for stage, task, key, scale, label in VARIANT_METRICS:
            if key.startswith("loss_") and not losses:
                continue
            a = values(runs, stage, task, fp32, key, "fp32", "pretext_precision", left_out)
            b = values(runs, stage, task, low, key, amp, "pretext_precision", left_out)
            rows.append(row(what, amp, label, a, b, scale))
    for (stage, fp32_task), (_, low_task), amp in task_pairs(profile):
        for variant in profile.tasks()[(stage, low_task)].variants:
            what = f"{low_task} vs {fp32_task}, on {titles.get(variant, variant)}"
            for key, scale, label in TASK_METRICS:
                a = values(runs, stage, fp32_task, variant, key, "fp32", left_out=left_out)
                b = values(runs, stage, low_task, variant, key, amp, left_out=left_out)
                rows.append(row(what, amp, label, a, b, scale))
    return pd.DataFrame([r for r in rows if r is not None])


def write_precision(
    runs: pd.DataFrame, profile: Profile, out: Path, name: str = "precision", where: str = "",
    losses: bool = True,
) -> list[str]:  # fmt: skip
    """``<name>``.csv / .md of ``profile`` from ``runs`` into ``out`` (``where``: a sentence on
    where the runs come from; ``losses``: with the loss curves, read from the run folders); the
    README's Markdown section (none when the profile compares no precisions)."""
    if runs.empty or not (variant_pairs(profile) or task_pairs(profile)):
        return []
    left_out: set = set()
    table = precision_table(runs, profile, left_out, losses)
    if table.empty:
        return []
    atomic_write_text(out / f"{name}.csv", table.drop(columns="cell").to_csv(index=False))
    fmt = lambda m, s: f"{m:.3g}" + ("" if np.isnan(s) else f" ± {s:.2g}")  # noqa: E731
    low = table["amp"].iloc[0] if table["amp"].nunique() == 1 else "low precision"
    shown = pd.DataFrame({
        "compared": table["compared"], "metric": table["metric"], "n": table["n"],
        "fp32": [fmt(m, s) for m, s in zip(table["fp32_mean"], table["fp32_std"])],
        low: [fmt(m, s) for m, s in zip(table["low_mean"], table["low_std"])],
        f"{low} − fp32 [95% CI]": table["cell"],
    })  # fmt: skip
    excluded = table[table["excludes_0"]]
    verdict = [f"- {r.compared}, {r.metric}: {r.cell}" for r in excluded.itertuples()]
    lines = [
        "## Precision: bf16 autocast against fp32, paired by seed",
        "",
        to_markdown(shown),
        f"Mean ± sample std over seeds; {low} − fp32 with the paired-seed 95% t-interval "
        "(`*`: it excludes 0; at 95% about 1 in 20 intervals excludes 0 where nothing differs). "
        f"Evaluations in the profile's splits (precision.yaml: train -> val).{where}",
        "",
        "Differences whose interval excludes 0:" if verdict else "No interval excludes 0.",
        *verdict,
        "",
    ]
    if left_out:  # e.g. an fp32 partner without amp= that amp=auto trained in bf16 on this machine
        lines += [
            "Left out, as their run folder records another precision than their side of the pair "
            "(task, variant, seed: recorded):",
            *(f"- {t}, {v}, seed {s}: {g}" for t, v, s, g in sorted(left_out)),
            "",
        ]
    atomic_write_text(out / f"{name}.md", "\n".join(lines))
    return lines


SEED_OFFSET = 100  # the k-th pooled folder's seed s is seed k * 100 + s


def pooled_runs(folders: list[Path]) -> pd.DataFrame:
    """The run lists (``runs.csv``) of ``folders`` as one, the k-th folder's seeds offset by
    k * :data:`SEED_OFFSET` so that each (machine, seed) is its own pair."""
    frames = []
    for k, folder in enumerate(folders):
        path = folder / "runs.csv"
        if not path.is_file():
            raise UserError(f"{path}: no run list (a results folder of orchestrate.report)")
        runs = read_run_list(path)
        if (runs["seed"] >= SEED_OFFSET).any():
            raise UserError(f"{path}: seeds of {SEED_OFFSET} or more cannot be pooled")
        frames.append(runs.assign(seed=runs["seed"] + k * SEED_OFFSET))
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description="bf16 against fp32, pooled over machines")
    p.add_argument("folders", type=Path, nargs="+", help="results folders of the same profile")
    p.add_argument("--profile", default="precision", help="the profile (name or yaml path)")
    p.add_argument("--names", nargs="+", default=None, help="what each folder is (the CPUs)")
    p.add_argument("--out", type=Path, required=True, help="write precision_pooled.csv/.md here")
    args = p.parse_args(argv)
    names = args.names or [str(f) for f in args.folders]
    if len(names) != len(args.folders):
        raise UserError(f"--names: {len(names)} names for {len(args.folders)} folders")
    runs = pooled_runs(args.folders)
    where = (
        " Pooled: "
        + "; ".join(
            f"seeds {k * SEED_OFFSET}+ from `{f}` ({n})"
            for k, (f, n) in enumerate(zip(args.folders, names))
        )
        + " (the loss curves need the run folders: left out)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(profile_path(args.profile))
    lines = write_precision(runs, profile, args.out, "precision_pooled", where, losses=False)
    if not lines:
        raise UserError(f"{args.profile}: no precision pair with runs in {args.folders}")
    print(f"wrote {args.out / 'precision_pooled.md'}")
    return lines


if __name__ == "__main__":
    run_cli(main)
