"""results/ from hand-written run records: the frozen-layer table, Table 2's differences to random
init, and the SVM-per-layer figure."""

import json
import re
import shutil
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.cli import run_cli
from core.features import LAYERS
from orchestrate.profile import Pretext, Profile, Task, Variant
from orchestrate.report import write_report


def record(root, stage, task, variant, seed, result):
    # the pipeline's scheme (orchestrate.jobs.run_dir_for): <stage>/<task>/..., pretext/<variant>/...
    run_dir = root.joinpath(*([stage] if task == stage else [stage, task]), variant, f"seed{seed}")
    run_dir.mkdir(parents=True)
    info = {"stage": stage, "task": task, "variant": variant, "seed": seed, "status": "done"}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "result.json").write_text(json.dumps(result))


def random_vs_ce_profile(tmp_path, tasks):
    """A profile of random init and the context encoder, 3 seeds, runs under tmp_path/runs."""
    return Profile(
        name="t", runs_root=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
        data="/nowhere", seeds=[0, 1, 2],
        pretext=Pretext(config="pretext/configs/builtin.yaml",
                        variants={"random_init": Variant(title="Random initialization"),
                                  "context_encoder": Variant(title="Context encoder")}),
        eval=tasks,
    )  # fmt: skip


def test_report_writes_frozen_table_differences_and_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    # context encoder: layer l scores 0.30 + 0.05 l + 0.01 seed; random init 0.30 + 0.01 seed
    # (+0.001 seed^2 so the paired differences are not all equal)
    for seed in range(3):
        for variant, slope in (("random_init", 0.0), ("context_encoder", 0.05)):
            layers = {
                f"svm_{layer}_mAP": 0.30 + slope * i + 0.01 * seed + 0.001 * seed**2 * (slope > 0)
                for i, layer in enumerate(LAYERS)
            }
            best = layers["svm_conv5_mAP"]
            # low-shot at k = 64 and 1 (columns come from the recorded k, sorted): CE +0.1 at k=64
            lowshot = {"lowshot_k64_mAP": 0.4 + 0.1 * (slope > 0) + 0.01 * seed,
                       "lowshot_k1_mAP": 0.2 + 0.01 * seed}  # fmt: skip
            record(runs, "eval", "frozen", variant, seed,
                   {**layers, **lowshot, "svm_best_mAP": best, "knn_mAP": best - 0.1})  # fmt: skip
            record(runs, "pretext", "pretext", variant, seed, {"train_time_s": 60.0})
    # a run of another profile sharing this runs root (PROFILE=ablation does): not in the report
    record(runs, "eval", "frozen", "other_profile_variant", 0, {"svm_best_mAP": 0.9})
    profile = random_vs_ce_profile(tmp_path, {
        "frozen": Task(module="eval.frozen", variants=["random_init", "context_encoder"]),
        "inpainting": Task(module="eval.inpainting_bench", per="profile", figures=["grid.png"]),
    })  # fmt: skip
    grid = runs / "eval" / "inpainting" / "all" / "seed0" / "grid.png"  # the task's one run
    grid.parent.mkdir(parents=True)
    grid.write_bytes(b"a figure the run drew")
    monkeypatch.setenv("CE_TABLE_START", str(int(time.time()) - 150))  # as `make table` exports
    out = write_report(profile, 1.0, "make table")

    layers_md = (out / "frozen_layers.md").read_text()
    assert "| Random initialization | 31.0 ± 1.0 (n=3) |" in layers_md  # 30, 31, 32
    # conv5: 50.0 / 51.1 / 52.4, paired differences 20.0 / 20.1 / 20.4 -> interval above 0: starred
    assert "51.2 ± 1.2 (n=3); Δ +20.2 [+19.6, +20.7]*" in layers_md
    lowshot_md = (out / "frozen_lowshot.md").read_text()
    assert "| Method | k=1 (VOC07 mAP %) | k=64 (VOC07 mAP %) |" in lowshot_md
    assert "| Random initialization | 21.0 ± 1.0 (n=3) | 41.0 ± 1.0 (n=3) |" in lowshot_md
    assert "51.0 ± 1.0 (n=3); Δ +10.0 [+10.0, +10.0]*" in lowshot_md
    long = (out / "frozen_layers_runs.csv").read_text()
    assert "paired" in long
    t2 = (out / "table2_transfer.md").read_text()
    assert "Frozen SVM, best layer" in t2 and "Frozen kNN" in t2 and "Δ +20.2 [+19.6, +20.7]*" in t2
    t2_csv = pd.read_csv(out / "table2_transfer.csv").set_index("Method")
    assert t2_csv.loc["Context encoder", "Pretraining time (min)"] == "1.00 ± 0.00 (n=3)"  # no Δ
    assert t2_csv.loc["Context encoder", "Frozen kNN (VOC07 mAP %)"].startswith(
        "41.2 ± 1.2 (n=3); Δ"
    )
    listed = pd.read_csv(out / "runs.csv")
    assert set(listed["variant"]) == {"random_init", "context_encoder"} and len(listed) == 12
    readme = (out / "README.md").read_text()
    assert "paired by seed" in readme
    wall = re.search(
        r"`make table` wall time \(set-up, data generation and pipeline\): ([\d.]+) min", readme
    )
    assert wall and 2.4 <= float(wall.group(1)) <= 3.0  # 150 s ago
    assert re.search(r"- machine: \S.*, x86_64|- machine: \S.*, \w+, \w+, \d+ CPUs", readme)
    assert (out / "figures" / "grid.png").read_bytes() == b"a figure the run drew"
    png = np.asarray(Image.open(out / "figures" / "frozen_svm_layers.png"))
    assert png.shape[0] > 200 and png.std() > 0  # a drawn figure, not a blank canvas


def test_training_curves_skip_runs_without_a_reconstruction_loss(tmp_path):
    """A supervised pretext run logs a classification loss only: no curve, no crash."""
    from orchestrate.report import training_curves

    rows = []
    for variant, record_keys in (("context_encoder", {"loss_rec": 0.1}), ("supervised", {})):
        run_dir = tmp_path / variant
        run_dir.mkdir()
        lines = [json.dumps({"step": s, "loss": 0.5, **record_keys}) for s in (10, 20)]
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        rows.append({"stage": "pretext", "status": "done", "variant": variant, "seed": 0,
                     "run_dir": str(run_dir)})  # fmt: skip
    training_curves(pd.DataFrame(rows), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def resolution_profile(tmp_path):
    return Profile(
        name="t", runs_root=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
        data="/nowhere", seeds=[0, 1, 2],
        pretext=Pretext(config="pretext/configs/builtin.yaml",
                        variants={"random_init": Variant(title="Random initialization"),
                                  "autoencoder": Variant(title="Autoencoder"),
                                  "context_encoder": Variant(title="Context encoder"),
                                  "supervised": Variant(title="Supervised")}),
        eval={"frozen": Task(module="eval.frozen",
                             variants=["random_init", "autoencoder", "context_encoder",
                                       "supervised"])},
    )  # fmt: skip


def test_report_states_the_resolution_under_each_compared_table(tmp_path, monkeypatch):
    """Paired differences to random init: autoencoder (1, 2, 3), context encoder (2, 4, 6) points
    (variances 1 and 4: pooled std sqrt(2.5) = 1.581, 4 dof); the supervised row (+20) is not
    pooled. MDE at n = 3: 3.2640 x 1.581 = 5.16; half-width 4.3027 x 1.581 / sqrt(3) = 3.93;
    ±2 points: 5 seeds (n = 4: 3.1824 x 1.581 / 2 = 2.52; n = 5: 2.7764 x 1.581 / sqrt(5) = 1.96)."""
    from orchestrate.report import cli, rerender

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    diffs = {"random_init": (0, 0, 0), "autoencoder": (1, 2, 3), "context_encoder": (2, 4, 6),
             "supervised": (20, 21, 20)}  # fmt: skip
    for seed in range(3):
        for variant, d in diffs.items():
            base = 0.30 + 0.01 * seed
            layers = {f"svm_{layer}_mAP": base + d[seed] / 100 for layer in LAYERS}
            record(runs, "eval", "frozen", variant, seed,
                   {**layers, "svm_best_mAP": base + d[seed] / 100, "knn_mAP": base})  # fmt: skip
            record(runs, "pretext", "pretext", variant, seed, {"train_time_s": 60.0})
    profile = resolution_profile(tmp_path)
    out = write_report(profile, 1.0, "make table")

    svm = "Frozen SVM, best layer (VOC07 mAP %)"
    for name in ("table2_transfer", "frozen_layers"):
        md = (out / f"{name}.md").read_text()
        table, resolution = md.split("\n\n| Resolution against Random initialization |")
        assert "| Context encoder |" in table and "Δ" in table
        assert "| pooled std of Δ over seeds (dof) | " in resolution and "1.58 (4)" in resolution
        assert "| minimum detectable Δ, 95% two-sided, 80% power (n) |" in resolution
        assert "5.2 (n=3)" in resolution and "±3.9 (n=3)" in resolution
        assert "| seeds for a half-width ≤ 2 |" in resolution
        assert "of: Autoencoder, Context encoder." in resolution  # supervised not pooled
    res = pd.read_csv(out / "table2_transfer_resolution.csv").set_index("column")
    assert res.loc[svm, "seeds_for_target"] == 5 and res.loc[svm, "n"] == 3
    assert res.loc[svm, "mde"] == pytest.approx(3.2640 * np.sqrt(2.5), rel=1e-4)
    assert "Pretraining time (min)" not in res.index  # not compared: no resolution
    readme = (out / "README.md").read_text()
    table2 = readme.split("## Table 2")[1].split("\n## ")[0]
    assert "| Resolution against Random initialization |" in table2 and "5.2 (n=3)" in table2
    assert "minimum detectable" in readme and "seed-only" in readme

    # the tables again from runs.csv alone, without the run folders: the same files
    before = {p.name: p.read_text() for p in out.glob("*.md") if p.name != "README.md"}
    shutil.rmtree(runs)
    rerender(profile, out / "runs.csv")
    assert {p.name: p.read_text() for p in out.glob("*.md") if p.name != "README.md"} == before
    readme_again = (out / "README.md").read_text()
    assert readme_again.split("## Provenance")[0] == readme.split("## Provenance")[0]
    assert "- git commit:" in readme_again and "re-rendered from" in readme_again

    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli, ["--profile", str(write_profile(tmp_path, profile)), "--runs-csv",
                      str(tmp_path / "bad.csv")])  # fmt: skip
    assert exit_info.value.code == 2


def write_profile(tmp_path, profile):
    import yaml

    from core.config import to_dict

    path = tmp_path / "profile.yaml"
    fields = ("name", "runs_root", "results_dir", "data", "seeds", "pretext", "eval")
    path.write_text(yaml.safe_dump({k: to_dict(profile)[k] for k in fields}))
    return path


def test_report_shows_the_seeds_and_images_interval_from_recorded_scores(tmp_path, monkeypatch):
    from core import image_scores

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 8)) < 0.3).astype(np.float32)
    ids = [f"{i:06d}" for i in range(40)]
    for seed in range(3):
        for variant, signal in (("random_init", 0.5), ("autoencoder", 1.0),
                                ("context_encoder", 1.0), ("supervised", 3.0)):  # fmt: skip
            scores = labels * signal + rng.normal(size=labels.shape)
            value = image_scores.voc07_map(scores, labels, 0 * labels, "11points")
            run_dir = tmp_path / "runs" / "eval" / "frozen" / variant / f"seed{seed}"
            record(tmp_path / "runs", "eval", "frozen", variant, seed,
                   {"svm_best_mAP": value, "knn_mAP": value})  # fmt: skip
            image_scores.save(run_dir, ids, labels, 0 * labels, "11points",
                              {"svm_best_mAP": scores})  # fmt: skip
    out = write_report(resolution_profile(tmp_path), 1.0, "make table")
    t2 = pd.read_csv(out / "table2_transfer.csv").set_index("Method")
    cell = t2.loc["Supervised", "Frozen SVM, best layer (VOC07 mAP %)"]
    assert re.fullmatch(
        r".*; Δ \+[\d.]+ \[.*\]\*?; seeds\+images \[[+-][\d.]+, \+[\d.]+\]\*?", cell
    )
    assert "seeds+images" not in t2.loc["Supervised", "Frozen kNN (VOC07 mAP %)"]  # no scores
    long = pd.read_csv(out / "table2_transfer_runs.csv")
    row = long[(long["row"] == "Supervised") & long["column"].str.startswith("Frozen SVM")]
    assert row["image_var"].iloc[0] > 0 and row["comb_low"].iloc[0] <= row["ci_low"].iloc[0]


def test_report_writes_the_single_label_tables_per_layer(tmp_path, monkeypatch):
    """A profile with an eval.single_label task (the paper profile's ImageNet linear table, Zhang
    et al. 2017): top-1 / top-5 with Δ to random init, and val top-1 per layer conv1..bottleneck."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    for seed in range(3):
        for variant, gain in (("random_init", 0.0), ("context_encoder", 0.1)):
            per_layer = {f"linear_{layer}_top1": 0.2 + gain * i / 5 + 0.01 * seed
                         for i, layer in enumerate(LAYERS)}  # fmt: skip
            best = per_layer["linear_conv5_top1"]
            record(runs, "eval", "single_label", variant, seed,
                   {**per_layer, "linear_top1": best, "linear_top5": best + 0.3,
                    "knn_top1": best - 0.05, "knn_top5": best + 0.2})  # fmt: skip
            record(runs, "pretext", "pretext", variant, seed, {"train_time_s": 60.0})
    variants = ["random_init", "context_encoder"]
    profile = random_vs_ce_profile(
        tmp_path, {"single_label": Task(module="eval.single_label", variants=variants)}
    )
    out = write_report(profile, 1.0, "make table")
    table = pd.read_csv(out / "single_label.csv").set_index("Method")
    # conv5 (i = 4): random 20 / 21 / 22, CE 28 / 29 / 30 -> Δ +8.0 exactly on every seed
    assert table.loc["Random initialization", "Linear top-1 (%)"] == "21.0 ± 1.0 (n=3)"
    assert table.loc["Context encoder", "Linear top-1 (%)"].startswith(
        "29.0 ± 1.0 (n=3); Δ +8.0 [+8.0, +8.0]*"
    )
    layers = pd.read_csv(out / "single_label_layers.csv").set_index("Method")
    assert list(layers.columns) == [f"{layer} linear top-1 (%)" for layer in LAYERS]
    assert layers.loc["Context encoder", "conv1 linear top-1 (%)"].startswith("21.0 ± 1.0 (n=3)")
    assert "Single-label linear probe: val top-1 per layer" in (out / "README.md").read_text()


def test_provenance_counts_the_precision_each_task_trained_in():
    from orchestrate.report import precision_line

    runs = pd.DataFrame({"task": ["pretext", "pretext", "pretext", "classify", "frozen"],
                         "precision": ["bf16", "bf16", "fp32", "bf16", None]})  # fmt: skip
    assert precision_line(runs) == [
        "- precision the runs trained in (their meta.json): classify bf16 x 1; pretext bf16 x 2; "
        "pretext fp32 x 1 (docs/precision.md)"
    ]
    assert precision_line(runs.assign(precision=None)) == []  # folders from before the record
    assert precision_line(runs.drop(columns="precision")) == []
