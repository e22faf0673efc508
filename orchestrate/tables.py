"""Result tables built from recorded runs (pandas): the paper's Table 1 and Table 2.

Every run folder written by :mod:`orchestrate.pipeline` (local or SLURM executor) has a
``run.json`` that says what it is (stage, task, variant, seed, the command) and, once finished, a
``result.json`` with its flat metrics; a run that crashed has ``status: failed`` in ``run.json``.
Tables are pure functions of those records, so every cell can be traced back to its run folders
(``runs`` column of the long CSV).

Under a table compared with a baseline, its resolution (:func:`resolution_table`): per column the
minimum detectable difference at the table's seeds and the seeds a ±2-point interval would take.
Where the runs recorded per-image test scores (``scores.npz``, :mod:`core.image_scores`), a cell
also shows an interval over seeds *and* test images (:class:`ImageBootstrap`,
:func:`combined_interval`) beside the interval over seeds.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

from core import image_scores, run_folder
from core.atomic_io import atomic_write_text
from core.cli import UserError
from core.features import LAYERS


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
FROZEN_LAYER_COLUMNS = tuple(
    Column(f"{layer} (VOC07 mAP %)", "eval", "frozen", f"svm_{layer}_mAP", 100.0)
    for layer in LAYERS
)


# Single-label protocols (eval/single_label.py) on a class-subfolder folder: top-1 / top-5 on val of
# the layer (and lr) chosen on a held-out part of train, and top-1 per layer (Zhang et al. 2017).
SINGLE_LABEL_COLUMNS = (
    Column("Linear top-1 (%)", "eval", "single_label", "linear_top1", 100.0),
    Column("Linear top-5 (%)", "eval", "single_label", "linear_top5", 100.0),
    Column("kNN top-1 (%)", "eval", "single_label", "knn_top1", 100.0),
    Column("kNN top-5 (%)", "eval", "single_label", "knn_top5", 100.0),
)
SINGLE_LABEL_LAYER_COLUMNS = tuple(
    Column(f"{layer} linear top-1 (%)", "eval", "single_label", f"linear_{layer}_top1", 100.0)
    for layer in LAYERS
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


# The run folder's meta.json keys of the precision a run trained in (core.machine.resolve_amp):
# a pretext run's, a fine-tuning classification run's.
PRECISION_KEYS = ("precision", "finetune_precision")


def recorded_precision(run_dir: Path) -> str | None:
    """``fp32`` / ``bf16`` / ``fp16``: what ``run_dir``'s meta.json records it trained in; None
    where it records none (a stage without training steps, a folder from before the record)."""
    try:
        meta = run_folder.read_meta(run_dir)
    except (OSError, json.JSONDecodeError):
        return None
    found = [meta[k] for k in PRECISION_KEYS if isinstance(meta, dict) and k in meta]
    return found[0] if found else None


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root`` (any depth): identity, status, the precision it
    trained in where its meta.json records one (``precision``), metrics (``m.<key>``)."""
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
        precision = recorded_precision(run_dir)
        if precision is not None:
            row["precision"] = precision
        result = run_dir / "result.json"
        if result.exists():
            row["status"] = "done"
            for key, value in json.loads(result.read_text()).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"m.{key}"] = float(value)
        rows.append(row)
    columns = ["stage", "task", "variant", "seed", "run_dir", "status"]
    return pd.DataFrame(rows, columns=columns if not rows else None)


RUN_LIST_COLUMNS = {"stage", "task", "variant", "seed", "run_dir", "status"}


def read_run_list(path: Path) -> pd.DataFrame:
    """A ``runs.csv`` as :mod:`orchestrate.report` writes it (:func:`collect_runs`' table); a file
    that is not one is a UserError (one ``error:`` line)."""
    try:
        runs = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path}: cannot read a runs table ({err})") from err
    missing = RUN_LIST_COLUMNS - set(runs.columns)
    if missing:
        raise UserError(f"{path}: not a runs.csv of orchestrate.report, missing {sorted(missing)}")
    return runs


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


# ---- resolution: the difference a column can see ------------------------------------------------
# Minimum detectable difference (MDE) of the two-sided paired t-test over n seeds: the true mean
# difference delta that the level-alpha test detects with probability ``power``. Exact power from
# the noncentral t (Cohen 1988, *Statistical Power Analysis*, §2.3; statsmodels' TTestPower): with
# d_s ~ N(delta, sd^2), t = mean(d) / (sd(d) / sqrt(n)) ~ nct(n - 1, delta sqrt(n) / sd) and
#     power(delta) = P(t > t_{1-alpha/2, n-1}) + P(t < -t_{1-alpha/2, n-1}),
# solved for delta. The textbook (t_{1-alpha/2, n-1} + t_{1-beta, n-1}) sd / sqrt(n) is 5% low at
# n = 3 (3.10 sd instead of 3.26 sd) and agrees as n grows.


def paired_t_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided level-``alpha`` paired t-test over ``n`` pairs at true mean
    difference ``delta`` when the differences have std ``sd``."""
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    nc = abs(delta) * math.sqrt(n) / sd
    lower = stats.nct.sf(crit, df, -nc)  # = P(t < -crit); scipy's nct.cdf is NaN far in the tail
    return float(stats.nct.sf(crit, df, nc) + (0.0 if math.isnan(lower) else lower))


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The |delta| at which :func:`paired_t_power` is ``power`` (NaN for n < 2 or no std)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    gap = lambda delta: paired_t_power(delta, 1.0, n, alpha) - power  # noqa: E731
    high = 1.0
    while gap(high) < 0:
        high *= 2
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-12) * sd)


def ci_half_width(sd: float, n: int, level: float = 0.95) -> float:
    """Half-width t_{(1+level)/2, n-1} sd / sqrt(n) of the paired t-interval over ``n`` seeds."""
    if n < 2:
        return float("nan")
    return float(stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n))


def seeds_for_half_width(
    sd: float, target: float, level: float = 0.95, max_n: int = 100_000
) -> int | None:
    """The fewest seeds n >= 2 with :func:`ci_half_width` (sd, n) <= ``target`` (sd plugged in as
    if known); None when no std or more than ``max_n`` would be needed."""
    if not math.isfinite(sd):
        return None
    for n in range(2, max_n + 1):
        if ci_half_width(sd, n, level) <= target:
            return n
    return None


def pooled_sd(groups: list[np.ndarray]) -> tuple[float, int]:
    """(sqrt(sum (n_r - 1) s_r^2 / sum (n_r - 1)), its degrees of freedom) over the groups with
    at least two values; (NaN, 0) when there are none."""
    groups = [np.asarray(g, np.float64) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return float("nan"), 0
    return float(math.sqrt(sum((len(g) - 1) * g.var(ddof=1) for g in groups) / dof)), dof


# ---- seeds and test images: a paired bootstrap over the test images -----------------------------


class ImageBootstrap:
    """Bootstrap resamples of the test images (Efron & Tibshirani 1993, ch. 6), one set shared by
    every run of a table: resample b draws the same images for every method and seed, so each
    difference to the baseline is paired by image as well as by seed. Every resample's mAP is
    recomputed from the run's ``scores.npz`` (:func:`core.image_scores.resampled_maps`)."""

    def __init__(self, resamples: int = 1000, seed: int = 0, chunk: int = 250):
        self.resamples, self.seed, self.chunk = resamples, seed, chunk
        self._arrays: dict[str, dict[str, np.ndarray] | None] = {}
        self._maps: dict[tuple[str, str], np.ndarray | None] = {}

    def index(self, m: int) -> np.ndarray:
        """[resamples, m] test rows, drawn with replacement from (seed, m) only."""
        return np.random.default_rng([self.seed, m]).integers(0, m, (self.resamples, m))

    def _scores(self, run_dir: str) -> dict[str, np.ndarray] | None:
        if run_dir not in self._arrays:
            self._arrays[run_dir] = image_scores.load(run_dir)
        return self._arrays[run_dir]

    def maps(self, run_dir: str, metric: str, recorded: float) -> np.ndarray | None:
        """mAP of ``metric`` of one run on each resample [resamples], None without its scores;
        the scores must reproduce the ``recorded`` value (result.json)."""
        arrays = self._scores(run_dir)
        if arrays is None or metric not in arrays:
            return None
        if (run_dir, metric) not in self._maps:
            full = image_scores.voc07_map(arrays[metric], arrays["labels"],
                                          arrays["difficult_only"], str(arrays["ap_mode"]))  # fmt: skip
            if not math.isclose(full, recorded, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(
                    f"{Path(run_dir) / image_scores.FILE}: {metric} scores give mAP {full:.6f}, "
                    f"result.json {recorded:.6f}"
                )
            index = self.index(len(arrays["ids"]))
            parts = [image_scores.resampled_maps(arrays, metric, index[i : i + self.chunk])
                     for i in range(0, len(index), self.chunk)]  # fmt: skip
            self._maps[(run_dir, metric)] = np.concatenate(parts)
        return self._maps[(run_dir, metric)]

    def differences(
        self, runs: dict[int, tuple[str, float]], base: dict[int, tuple[str, float]], metric: str
    ) -> np.ndarray | None:
        """mAP(run) - mAP(baseline run) of each seed on each resample [seeds, resamples], seeds
        in order. ``runs`` / ``base``: {seed: (run folder, recorded value)}, the same seeds. None
        when a run has no scores or the runs did not score the same test images."""
        ids, diffs = None, []
        for seed in sorted(runs):
            pair = []
            for run_dir, recorded in (runs[seed], base[seed]):
                arrays = self._scores(run_dir)
                if arrays is None or metric not in arrays:
                    return None
                if ids is None:
                    ids = arrays["ids"]
                elif not np.array_equal(arrays["ids"], ids):
                    return None
                pair.append(self.maps(run_dir, metric, recorded))
            diffs.append(pair[0] - pair[1])
        return np.stack(diffs)


@dataclass(frozen=True)
class Combined:
    """An interval for a paired difference over seeds and test images (:func:`combined_interval`)."""

    low: float
    high: float
    seed_var: float  # s_d^2 / n: the seeds' part of Var(mean difference)
    image_var: float  # the test images' part the seeds share (bootstrap covariance across seeds)

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def combined_interval(
    differences: np.ndarray, resampled: np.ndarray, level: float = 0.95
) -> Combined:
    """mean(d) +- sqrt(t_{q, n-1}^2 a + z_q^2 b), q = (1 + level) / 2, for the n per-seed
    differences d on the test set and their bootstrap replicates ``resampled`` [n, B] (the same
    resampled images for every seed, :meth:`ImageBootstrap.differences`).

    Model d_s = mu + e_s + g + h_s: seed effect e, test-set effect g shared by every seed, seed x
    image effect h. The seed interval's a = s_d^2 / n already holds e and h (the seeds' spread on a
    fixed test set); what it misses is g, which no number of seeds averages away. b estimates
    Var(g) as the mean bootstrap covariance between two seeds' differences (0 if negative); each
    part's half-width is taken at its own quantile and added in quadrature.

    Never narrower than the seed interval (b = 0 gives it back), the normal bootstrap interval
    when the seeds agree (a = 0). Welch-Satterthwaite degrees of freedom for a + b would narrow it
    below the seed interval and, at n = 3, cover less than 95% when the seed variance dominates
    (tests/eval/test_resolution.py simulates both).
    """
    d = np.asarray(differences, np.float64)
    n, mean = len(d), float(d.mean())
    cov = np.atleast_2d(np.cov(np.asarray(resampled, np.float64)))
    shared = (cov.sum() - np.trace(cov)) / (n * (n - 1))
    a, b = float(d.var(ddof=1) / n), max(float(shared), 0.0)
    t, z = _quantiles(level, n - 1)
    half = math.sqrt(t**2 * a + z**2 * b)
    return Combined(mean - half, mean + half, a, b)


@functools.lru_cache(maxsize=64)
def _quantiles(level: float, dof: int) -> tuple[float, float]:
    """(t_{q, dof}, z_q), q = (1 + level) / 2."""
    q = (1 + level) / 2
    return float(stats.t.ppf(q, dof)), float(stats.norm.ppf(q))


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


def format_combined(c: Combined, digits: int) -> str:
    """``seeds+images [+1.9, +9.3]*`` (``*``: the interval excludes 0)."""
    text = f"seeds+images [{c.low:+.{digits}f}, {c.high:+.{digits}f}]"
    return text + ("*" if c.significant else "")


def _combined(
    bootstrap: ImageBootstrap, col: Column, prefix: str, done: pd.DataFrame, base_done: pd.DataFrame
) -> Combined | None:
    """The seeds + test images interval of a paired cell, None when a run has no scores."""
    key = f"{prefix}{col.metric}"

    def by_seed(frame: pd.DataFrame) -> dict[int, tuple[str, float]]:
        return {int(s): (str(r), float(v))
                for s, r, v in zip(frame["seed"], frame["run_dir"], frame[f"m.{key}"])}  # fmt: skip

    runs, base = by_seed(done), by_seed(base_done)
    resampled = bootstrap.differences(runs, base, key)
    if resampled is None:
        return None
    d = np.array([(runs[s][1] - base[s][1]) * col.scale for s in sorted(runs)])
    return combined_interval(d, resampled * col.scale)


def build_table(
    runs: pd.DataFrame,
    columns: tuple[Column, ...],
    rows: list[tuple[str, ...]],
    baseline: str | None = None,
    bootstrap: ImageBootstrap | None = None,
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

    ``bootstrap``: a paired difference whose runs all recorded the column's per-image scores also
    gets the interval over seeds and test images (:func:`combined_interval`), shown after the seed
    interval as ``seeds+images [lo, hi]`` (``*`` when it excludes 0) and in the long table as
    ``seed_var``, ``image_var``, ``comb_low``, ``comb_high``, ``comb_significant``.
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
                _, base_done, base = _cell_runs(runs, col, baseline, base_prefix.get(baseline, ""))
                d = difference_ci(by_seed, base)
                if d is not None:
                    line[col.title] += f"; {format_difference(d, col.digits)}"
                    record.update(diff=d.diff, ci_low=d.low, ci_high=d.high, test=d.test,
                                  significant=d.significant)  # fmt: skip
                same_metric = (prefix[0] if prefix else "") == base_prefix.get(baseline, "")
                if bootstrap is not None and d is not None and d.test == "paired" and same_metric:
                    c = _combined(bootstrap, col, (prefix[0] if prefix else ""), done, base_done)
                    if c is not None:
                        line[col.title] += f"; {format_combined(c, col.digits)}"
                        record.update(seed_var=c.seed_var, image_var=c.image_var, comb_low=c.low,
                                      comb_high=c.high, comb_significant=c.significant)  # fmt: skip
            long.append(record)
        display.append(line)
    return pd.DataFrame(display), pd.DataFrame(long)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def resolution_table(
    runs: pd.DataFrame,
    columns: tuple[Column, ...],
    rows: list[tuple[str, ...]],
    baseline: str,
    pooled: list[str] | None = None,
    target: float = 2.0,
    level: float = 0.95,
    power: float = 0.8,
) -> pd.DataFrame:
    """What each ``compare`` column can resolve against ``baseline``: one line per column.

    The paired differences to the baseline (seeds both rows have) of the ``pooled`` variants
    (default: every row but the baseline) give a pooled std (:func:`pooled_sd`); at the fewest
    pairs n among them: ``mde`` (:func:`min_detectable_difference`, two-sided 1 - ``level``,
    ``power``), ``ci_half_width`` (:func:`ci_half_width`), and ``seeds_for_target``, the seeds
    that would bring that half-width to ``target`` (:func:`seeds_for_half_width`).
    """
    prefix = {r[1]: (r[2] if len(r) > 2 else "") for r in rows}
    titles = {r[1]: r[0] for r in rows}
    pooled = [v for v in (titles if pooled is None else pooled) if v in titles and v != baseline]
    out = []
    for col in columns:
        if not col.compare:
            continue
        base = _cell_runs(runs, col, baseline, prefix[baseline])[2]
        groups, used = [], []
        for variant in pooled:
            values = _cell_runs(runs, col, variant, prefix[variant])[2]
            seeds = sorted(set(values) & set(base))
            if len(seeds) >= 2:
                groups.append(np.array([values[s] - base[s] for s in seeds]))
                used.append(titles[variant])
        sd, dof = pooled_sd(groups)
        n = min((len(g) for g in groups), default=0)
        out.append({
            "column": col.title, "baseline": titles[baseline], "rows": "; ".join(used), "n": n,
            "pooled_sd": sd, "dof": dof, "level": level, "power": power,
            "mde": min_detectable_difference(sd, n, 1 - level, power),
            "ci_half_width": ci_half_width(sd, n, level), "target_half_width": target,
            "seeds_for_target": seeds_for_half_width(sd, target, level), "digits": col.digits,
        })  # fmt: skip
    return pd.DataFrame(out)


def resolution_markdown(res: pd.DataFrame) -> str:
    """The resolution lines under a table: one column per compared column of the table."""
    if res.empty:
        return ""
    first = res.iloc[0]
    level, power, target = (round(100 * first["level"]), round(100 * first["power"]),
                            first["target_half_width"])  # fmt: skip

    def cells(fmt) -> list[str]:
        return [fmt(r) if r["dof"] > 0 else "—" for _, r in res.iterrows()]

    def num(value: float, digits: int) -> str:
        return f"{value:.{digits}f}"

    lines = {
        "pooled std of Δ over seeds (dof)": cells(
            lambda r: f"{num(r['pooled_sd'], r['digits'] + 1)} ({r['dof']})"),
        f"minimum detectable Δ, {level}% two-sided, {power}% power (n)": cells(
            lambda r: f"{num(r['mde'], r['digits'])} (n={r['n']})"),
        f"{level}% interval half-width (n)": cells(
            lambda r: f"±{num(r['ci_half_width'], r['digits'])} (n={r['n']})"),
        f"seeds for a half-width ≤ {target:g}": cells(
            lambda r: "> 100000" if pd.isna(r["seeds_for_target"])
            else str(int(r["seeds_for_target"]))),
    }  # fmt: skip
    table = pd.DataFrame(
        [[name, *values] for name, values in lines.items()],
        columns=[f"Resolution against {first['baseline']}", *res["column"]],
    )
    pooled = sorted({t for rows in res["rows"] for t in rows.split("; ") if t})
    note = (
        f"Pooled paired-seed std of the differences to {first['baseline']} of: "
        f"{', '.join(pooled) or 'no row'}. Minimum detectable Δ: the true difference a two-sided "
        f"paired t-test over the n seeds detects with {power}% power (noncentral t, "
        f"`orchestrate/tables.py::min_detectable_difference`); seeds for a half-width ≤ {target:g}: the "
        "pooled std plugged into the t-interval."
    )
    return to_markdown(table) + "\n" + note + "\n"


def write_table(
    df: pd.DataFrame,
    long: pd.DataFrame,
    out_dir: str | Path,
    name: str,
    title: str,
    resolution: pd.DataFrame | None = None,
) -> None:
    """``<name>.csv`` / ``.md`` / ``_runs.csv``; with ``resolution`` (:func:`resolution_table`)
    also ``<name>_resolution.csv`` and its lines under the Markdown table."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / f"{name}.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / f"{name}_runs.csv", long.to_csv(index=False))
    md = f"## {title}\n\n" + to_markdown(df)
    if resolution is not None:
        atomic_write_text(out_dir / f"{name}_resolution.csv", resolution.to_csv(index=False))
        md += "\n" + resolution_markdown(resolution)
    atomic_write_text(out_dir / f"{name}.md", md)
