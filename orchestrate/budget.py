"""Pretext-budget curves (``PROFILE=budget make table``), from the recorded runs: frozen VOC07 SVM
test mAP (best layer and conv5) against the images each pretext run saw, one line per method,
the training-free rows (random init, k-means init) as horizontal bands.

A profile has budget curves when its frozen variants come from a ``grid: {optim.steps: [...]}``
(variant names ``<method>,optim.steps=<N>``): each budget is its own run, because the learning
rate schedule depends on ``optim.steps``. Images seen = the pretext run's recorded ``steps``
(``result.json``) x its ``optim.batch_size`` (its ``config.yaml``). A training-free variant (0
steps) is a band: mean ± sample std over seeds.

Outputs in ``<results_dir>``: ``figures/pretext_budget.png``, ``pretext_budget.csv`` / ``.md``
(per method and budget: mean ± std over seeds, Δ to random init with a paired-seed 95% t-interval,
:func:`orchestrate.tables.difference_ci`; under the table, per method and metric, the first budget
whose interval lies above 0, or that none does) and ``figures/pretext_budget_probe.png`` (the
pretext runs' online kNN probe, ``metrics.jsonl``, against images seen) when the runs probed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic_io import atomic_save, atomic_write_text, read_jsonl
from core.config import read_yaml
from orchestrate.profile import Profile
from orchestrate.tables import difference_ci, format_difference, to_markdown

STEPS_KEY = "optim.steps="
METRICS = {"svm_best_mAP": "Frozen SVM, best layer", "svm_conv5_mAP": "Frozen SVM, conv5"}
BASELINE = "random_init"


def base_name(variant: str) -> str:
    """``context_encoder,optim.steps=400`` -> ``context_encoder`` (other grid keys kept)."""
    return ",".join(p for p in variant.split(",") if not p.startswith(STEPS_KEY))


def has_budgets(profile: Profile) -> bool:
    variants = profile.eval["frozen"].variants if "frozen" in profile.eval else []
    return any(STEPS_KEY in v for v in variants)


def base_titles(profile: Profile) -> dict[str, str]:
    """method -> its row title without the grid's ``(optim.steps=N)``."""
    out = {}
    for name, spec in profile.pretext.variants.items():
        title = spec.title or name
        cut = title.find(f" ({STEPS_KEY}")
        out.setdefault(base_name(name), title[:cut] if cut >= 0 else title)
    return out


def budget_runs(runs: pd.DataFrame, profile: Profile) -> pd.DataFrame:
    """One row per finished frozen run of the profile: method, variant, seed, steps, images_seen,
    the pretext run folder and ``METRICS`` (in %)."""
    done = runs[runs["status"] == "done"]
    pretext = done[done["stage"] == "pretext"].set_index(["variant", "seed"])
    frozen = done[(done["stage"] == "eval") & (done["task"] == "frozen")]
    rows = []
    for _, r in frozen.iterrows():
        key = (r["variant"], r["seed"])
        if key not in pretext.index:
            continue
        pre = pretext.loc[key]
        steps = int(pre.get("m.steps", 0) or 0)
        batch = int(read_yaml(Path(pre["run_dir"]) / "config.yaml")["optim"]["batch_size"])
        row = {"method": base_name(r["variant"]), "variant": r["variant"], "seed": int(r["seed"]),
               "steps": steps, "images_seen": steps * batch, "pretext_run": pre["run_dir"]}  # fmt: skip
        row.update({m: 100 * r.get(f"m.{m}", np.nan) for m in METRICS})
        rows.append(row)
    return pd.DataFrame(rows)


def budget_table(long: pd.DataFrame, titles: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """(one line per method and budget: n, mean, std, Δ to random init and its interval per
    metric; the crossing sentences)."""
    base = long[long["method"] == BASELINE]
    methods = [m for m in titles if m in set(long["method"])]  # the profile's order
    rows, lines = [], []
    for method in methods:
        sel = long[long["method"] == method]
        for steps, at in sel.groupby("steps", sort=True):
            row = {"method": method, "title": titles.get(method, method), "steps": steps,
                   "images_seen": int(at["images_seen"].iloc[0]), "n": len(at)}  # fmt: skip
            for m in METRICS:
                vals = dict(zip(at["seed"], at[m]))
                row[f"{m}_mean"] = float(np.mean(list(vals.values())))
                row[f"{m}_std"] = float(pd.Series(list(vals.values())).std())
                d = (
                    None
                    if method == BASELINE
                    else difference_ci(vals, dict(zip(base["seed"], base[m])))
                )
                row.update({f"{m}_delta": d.diff if d else np.nan, f"{m}_low": d.low if d else np.nan,
                            f"{m}_high": d.high if d else np.nan, f"{m}_test": d.test if d else ""})  # fmt: skip
                row[f"{m}_cell"] = cell(row, m, d)
            rows.append(row)
    table = pd.DataFrame(rows)
    for method in methods:
        trained = table[(table["method"] == method) & (table["steps"] > 0)]
        if method == BASELINE or trained.empty or base.empty:
            continue
        for m, name in METRICS.items():
            above = trained[trained[f"{m}_low"] > 0]
            if len(above):
                first = above.iloc[0]
                verdict = (f"crosses random init at {first['steps']} steps "
                           f"({first['images_seen']} images)")  # fmt: skip
            else:
                verdict = (f"does not cross random init within the budgets tried "
                           f"({', '.join(str(s) for s in trained['steps'])} steps)")  # fmt: skip
            lines.append(f"- {titles.get(method, method)}, {name}: {verdict}")
    return table, lines


def cell(row: dict, metric: str, d) -> str:
    text = f"{row[f'{metric}_mean']:.1f}"
    if row["n"] > 1:
        text += f" ± {row[f'{metric}_std']:.1f}"
    return text + (f" ({format_difference(d, 1)})" if d is not None else "")


def budget_figure(long: pd.DataFrame, titles: dict[str, str], path: Path) -> None:
    """Two panels (best layer, conv5): mean ± std over seeds against images seen (log x), one
    line per trained method; every training-free method a band (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 4.5), sharey=False)
    free = long[long["steps"] == 0]
    trained = long[long["steps"] > 0]
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    order = {m: i for i, m in enumerate(titles)}  # the profile's order: random init first
    free = free.sort_values("method", key=lambda c: c.map(order), kind="stable")
    band_colours = dict(zip(dict.fromkeys(free["method"]), ["0.45", "tab:olive", "tab:cyan"]))
    line_colours = {m: next(colours) for m in dict.fromkeys(trained["method"])}
    for ax, (metric, name) in zip(axes, METRICS.items()):
        for method, sel in free.groupby("method", sort=False):
            mean, std = sel[metric].mean(), sel[metric].std() if len(sel) > 1 else 0.0
            colour = band_colours[method]
            ax.axhspan(mean - std, mean + std, color=colour, alpha=0.25)
            ax.axhline(mean, color=colour, lw=1, ls="--",
                       label=f"{titles.get(method, method)} (n={len(sel)})")  # fmt: skip
        for method, sel in trained.groupby("method", sort=False):
            g = sel.groupby("images_seen")[metric]
            x, mean = g.mean().index.to_numpy(), g.mean().to_numpy()
            std = g.std().fillna(0).to_numpy()
            lo, hi = g.count().min(), g.count().max()
            n = f"n={lo}" if lo == hi else f"n={lo}-{hi}"
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, lw=1.5, color=line_colours[method],
                        label=f"{titles.get(method, method)} ({n})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("pretext images seen (steps x batch size)")
        ax.set_ylabel("VOC07 test mAP (%), linear SVM")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Pretext budget: frozen features (mean ± std over seeds; bands: training-free)")
    fig.tight_layout()
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def probe_figure(long: pd.DataFrame, titles: dict[str, str], path: Path) -> bool:
    """The online kNN probe (val) of each trained method's largest budget against images seen,
    conv5 and the best probed layer at each step, mean ± std over seeds. False: no probe lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for method, sel in long[long["steps"] > 0].groupby("method", sort=False):
        top = sel[sel["steps"] == sel["steps"].max()]
        records = [r for run in top["pretext_run"] for r in read_jsonl(Path(run) / "metrics.jsonl")
                   if "images_seen" in r]  # fmt: skip
        if records:
            curves[method] = pd.DataFrame(records)
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, df in curves.items():
        layers = [c for c in df.columns if c.startswith("probe/knn_")]
        df = df.assign(best=df[layers].max(axis=1))
        for ax, col in zip(axes, ["probe/knn_conv5_mAP", "best"]):
            if col not in df.columns:
                continue
            g = 100 * df.groupby("images_seen")[col].agg(["mean", "std"]).fillna(0)
            x = g.index.to_numpy()
            ax.plot(x, g["mean"], marker=".", label=titles.get(method, method))
            ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], alpha=0.2)
    for ax, name in zip(axes, ["conv5", "best probed layer at each step"]):
        ax.set_xlabel("pretext images seen (the largest budget's runs)")
        ax.set_ylabel("kNN VOC07 mAP (%), val queries, train bank")
        ax.set_title(f"Online kNN probe: {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return True


def write_budget(runs: pd.DataFrame, profile: Profile, out: Path) -> list[str]:
    """The budget figure, table and crossing lines of ``profile`` from ``runs`` into ``out``;
    the Markdown section for the results README (none when the profile has no budgets)."""
    if not has_budgets(profile) or runs.empty:
        return []
    long = budget_runs(runs, profile)
    if long.empty:
        return []
    titles = base_titles(profile)
    table, crossings = budget_table(long, titles)
    atomic_write_text(
        out / "pretext_budget.csv",
        table.drop(columns=[c for c in table if c.endswith("_cell")]).to_csv(index=False),
    )
    shown = table[["title", "steps", "images_seen", "n", *[f"{m}_cell" for m in METRICS]]]
    shown.columns = ["Method", "Steps", "Images seen", "n", *METRICS.values()]
    budget_figure(long, titles, out / "figures" / "pretext_budget.png")
    probed = probe_figure(long, titles, out / "figures" / "pretext_budget_probe.png")
    lines = [
        "## Pretext budget: frozen VOC07 SVM test mAP against pretext images seen",
        "",
        to_markdown(shown),
        "Mean ± sample std over seeds (%); Δ to random init with its paired-seed 95% t-interval "
        "(`*`: it excludes 0). Crossing: the first budget whose interval lies above 0.",
        "",
        *crossings,
        "",
        "![budget](figures/pretext_budget.png)",
        *(["", "![probe](figures/pretext_budget_probe.png)"] if probed else []),
        "",
    ]
    atomic_write_text(out / "pretext_budget.md", "\n".join(lines))
    return lines
