"""results/ from hand-written run records: the frozen-layer table, Table 2's differences to random
init, and the SVM-per-layer figure."""

import json
import re
import time

import numpy as np
import pandas as pd
from PIL import Image

from core.jobs import Profile
from eval.report import write_report

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck")


def record(root, stage, task, variant, seed, result):
    # the pipeline's scheme (core.jobs.run_dir_for): <stage>/<task>/..., pretext/<variant>/...
    run_dir = root.joinpath(*([stage] if task == stage else [stage, task]), variant, f"seed{seed}")
    run_dir.mkdir(parents=True)
    info = {"stage": stage, "task": task, "variant": variant, "seed": seed, "status": "done"}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "result.json").write_text(json.dumps(result))


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
    profile = Profile(
        name="t", runs_root=str(runs), results_dir=str(tmp_path / "results"), data="/nowhere",
        seeds=[0, 1, 2],
        pretext={"config": "pretext/configs/builtin.yaml",
                 "variants": {"random_init": {"title": "Random initialization"},
                              "context_encoder": {"title": "Context encoder"}}},
        eval={"frozen": {"module": "eval.frozen", "variants": ["random_init", "context_encoder"]}},
    )  # fmt: skip
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
    png = np.asarray(Image.open(out / "figures" / "frozen_svm_layers.png"))
    assert png.shape[0] > 200 and png.std() > 0  # a drawn figure, not a blank canvas


def test_training_curves_skip_runs_without_a_reconstruction_loss(tmp_path):
    """A supervised pretext run logs a classification loss only: no curve, no crash."""
    from eval.report import training_curves

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
