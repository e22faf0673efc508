"""The precision profile's pairs and its bf16 − fp32 table from hand-written run records
(orchestrate/precision.py): the pairing rule, the paired intervals computed by hand, the loss
quarters from metrics.jsonl, and no section for a profile without amp pairs."""

from pathlib import Path

import pandas as pd
import pytest
from recorded_runs import fake_profile, record

from core.atomic_io import append_jsonl
from orchestrate.jobs import expand
from orchestrate.precision import amp_value, task_pairs, variant_pairs, write_precision
from orchestrate.profile import load_profile, profile_path
from orchestrate.tables import collect_runs

T_975_2 = 4.302653  # t quantile, 2 degrees of freedom (3 paired seeds)

# the profile after recorded_runs.HEAD
PROFILE = """\
  overrides: [data.num_workers=0]
  variants:
    random_init: {{overrides: [method=random_init]}}
    ce: {{title: "CE fp32"}}
    ce_bf16: {{title: "CE bf16", overrides: [amp=bf16]}}
    rot: {{title: "Rotation fp32", config: pretext/configs/rotation.yaml, overrides: [optim.steps=10]}}
    rot_bf16: {{config: pretext/configs/rotation.yaml, overrides: [amp=bf16, optim.steps=10]}}
    rot_other: {{config: pretext/configs/rotation.yaml, overrides: [amp=bf16, optim.steps=20]}}
    ce_off: {{overrides: [amp=off, optim.lr=1]}}
transfer:
  classify:
    module: transfer.classify
    args: ["checkpoint={{checkpoint}}", "modes=[finetune]"]
    variants: [ce, ce_bf16]
  classify_bf16:
    module: transfer.classify
    args: ["checkpoint={{checkpoint}}", "modes=[finetune]", "finetune.amp=bf16"]
    variants: [ce]
eval:
  frozen:
    module: eval.frozen
    variants: [ce, ce_bf16, rot, rot_bf16]
"""
# per seed: frozen SVM best layer (fraction) of the pretext variants, fine-tuned mAP of the tasks
SVM = {
    "ce": [0.30, 0.32, 0.34],
    "ce_bf16": [0.31, 0.35, 0.34],
    "rot": [0.4] * 3,
    "rot_bf16": [0.4] * 3,
}
FINETUNE = {("classify", "ce"): [0.20, 0.22, 0.24], ("classify", "ce_bf16"): [0.2, 0.2, 0.2],
            ("classify_bf16", "ce"): [0.22, 0.22, 0.27]}  # fmt: skip


def fake_runs(tmp_path):
    """The profile's run folders as the pipeline leaves them, with the CE runs' loss lines."""
    profile = fake_profile(tmp_path, "fake_precision", PROFILE)
    for job in expand(profile):
        result = {}
        if job.stage == "pretext" and job.variant.startswith("ce"):
            result = {"train_time_s": 120.0 if job.variant == "ce" else 60.0 + job.seed}
        elif job.task == "frozen":
            result = {"svm_best_mAP": SVM[job.variant][job.seed]}
        elif job.stage == "transfer":
            result = {"finetune_mAP": FINETUNE[(job.task, job.variant)][job.seed]}
        run_dir = record(job, result)
        if job.stage == "pretext" and job.variant.startswith("ce"):  # 8 logged losses
            lift = 0.1 if job.variant == "ce_bf16" else 0.0
            for k in range(8):
                append_jsonl(run_dir / "metrics.jsonl", {"step": k, "loss": k + lift + job.seed})
    return profile


def test_amp_value_finds_the_setting_of_any_section():
    assert amp_value(["a=1", "amp=bf16"]) == ("bf16", ["a=1"])
    assert amp_value(["finetune.amp=bf16", "b=2"]) == ("bf16", ["b=2"])
    assert amp_value(["damp=3"]) == (None, ["damp=3"])


def test_pairs_are_found_by_config_and_the_other_overrides(tmp_path):
    profile = fake_runs(tmp_path)
    # rot_other has no fp32 partner (optim.steps=20); ce_off is fp32 (amp=off), not a pair
    assert variant_pairs(profile) == [("ce", "ce_bf16", "bf16"), ("rot", "rot_bf16", "bf16")]
    assert task_pairs(profile) == [
        (("transfer", "classify"), ("transfer", "classify_bf16"), "bf16")
    ]


T_975_5 = 2.570582  # 5 degrees of freedom (6 pairs: 3 seeds on each of two machines)


def paired(diffs):
    d = pd.Series(diffs)
    half = {3: T_975_2, 6: T_975_5}[len(d)] * d.std() / len(d) ** 0.5
    return d.mean(), d.mean() - half, d.mean() + half


def test_table_holds_the_paired_differences_computed_by_hand(tmp_path):
    profile = fake_runs(tmp_path)
    out = Path(profile.results_dir)
    out.mkdir(parents=True)
    lines = write_precision(collect_runs(profile.runs_root), profile, out)
    table = pd.read_csv(out / "precision.csv")
    ce = table[table["compared"] == "pretext: CE bf16 vs CE fp32"].set_index("metric")

    svm = ce.loc["frozen SVM best layer, mAP"]
    mean, low, high = paired([1.0, 3.0, 0.0])  # (0.31-0.30, 0.35-0.32, 0.34-0.34) x 100
    assert (svm["n"], svm["fp32_mean"], svm["low_mean"]) == (
        3,
        pytest.approx(32.0),
        pytest.approx(33.333333),
    )
    assert (svm["diff"], svm["ci_low"], svm["ci_high"]) == pytest.approx((mean, low, high))
    assert not svm["excludes_0"]

    # losses k + seed (+0.1 for bf16), k = 0..7: first quarter k in {0, 1}, last k in {6, 7}
    first, last = ce.loc["pretext loss, first quarter"], ce.loc["pretext loss, last quarter"]
    assert (first["fp32_mean"], last["fp32_mean"]) == pytest.approx((1.5, 7.5))
    assert (first["diff"], last["diff"]) == pytest.approx((0.1, 0.1))
    time = ce.loc["pretext train time, min"]  # 2 min fp32; 1, 61/60, 62/60 min bf16
    assert time["diff"] == pytest.approx(-59 / 60) and bool(time["excludes_0"])
    # rows with nothing recorded on both sides are left out (no classify on rot, no loss lines)
    rot = table[table["compared"].str.startswith("pretext: rot_bf16")]
    assert set(rot["metric"]) == {"frozen SVM best layer, mAP"}
    assert rot["diff"].iloc[0] == pytest.approx(0.0)

    task = table[table["compared"] == "classify_bf16 vs classify, on CE fp32"].set_index("metric")
    mean, low, high = paired([2.0, 0.0, 3.0])
    row = task.loc["fine-tuned classification, mAP"]
    assert (row["diff"], row["ci_low"], row["ci_high"]) == pytest.approx((mean, low, high))
    text = (out / "precision.md").read_text()
    assert "\n".join(lines) == text and "Differences whose interval excludes 0:" in text
    assert "- pretext: CE bf16 vs CE fp32, pretext train time, min: Δ -0.98" in text


def test_a_profile_without_amp_pairs_has_no_precision_section(tmp_path):
    profile = load_profile(profile_path("builtin"))
    runs = pd.DataFrame([{"stage": "eval", "task": "frozen", "variant": "ce", "seed": 0,
                          "run_dir": "x", "status": "done"}])  # fmt: skip
    assert write_precision(runs, profile, tmp_path) == []
    assert not (tmp_path / "precision.md").exists()


def test_the_precision_profile_pairs_every_trained_method_and_fine_tuning():
    profile = load_profile(profile_path("precision"))
    fp32 = {p[0] for p in variant_pairs(profile)}
    assert fp32 == {"context_encoder", "rotation", "autoencoder", "relative_location", "supervised"}
    assert task_pairs(profile) == [
        (("transfer", "classify"), ("transfer", "classify_bf16"), "bf16")
    ]


def test_runs_whose_recorded_precision_is_not_their_side_of_the_pair_are_left_out(tmp_path):
    # amp=auto resolves per machine: on a CPU with AMX, a validated stage's "fp32" partner without
    # amp= trains in bf16. Its run folder says so, and the comparison leaves it out, and says so.
    profile = fake_runs(tmp_path)
    root = Path(profile.runs_root)
    (root / "pretext" / "ce" / "seed1" / "meta.json").write_text('{"precision": "bf16"}')
    for seed in (0, 2):
        (root / "pretext" / "ce" / f"seed{seed}" / "meta.json").write_text('{"precision": "fp32"}')
    for seed in range(3):
        (root / "pretext" / "ce_bf16" / f"seed{seed}" / "meta.json").write_text(
            '{"precision": "bf16"}'
        )
    ft = root / "transfer" / "classify_bf16" / "ce" / "seed2" / "meta.json"
    ft.write_text('{"finetune_precision": "fp32"}')  # a bf16 task that ran fp32: left out too
    runs = collect_runs(root)
    pre = runs[runs["stage"] == "pretext"].set_index(["variant", "seed"])["precision"]
    assert pre[("ce", 1)] == "bf16" and pre[("ce", 0)] == "fp32" and pd.isna(pre[("rot", 0)])
    out = Path(profile.results_dir)
    out.mkdir(parents=True)
    lines = write_precision(runs, profile, out)
    table = pd.read_csv(out / "precision.csv")
    ce = table[table["compared"] == "pretext: CE bf16 vs CE fp32"].set_index("metric")
    svm = ce.loc["frozen SVM best layer, mAP"]  # seeds 0 and 2: (0.31-0.30, 0.34-0.34) x 100
    assert svm["n"] == 2 and svm["diff"] == pytest.approx(0.5)
    assert ce.loc["pretext train time, min"]["n"] == 2
    task = table[table["compared"] == "classify_bf16 vs classify, on CE fp32"]
    assert set(task["n"]) == {2}  # the task's own precision: seed 2 left out, 0 and 1 compared
    text = "\n".join(lines)
    assert "- pretext, ce, seed 1: bf16" in text and "- classify_bf16, ce, seed 2: fp32" in text
    rot = table[table["compared"].str.startswith("pretext: rot_bf16")]
    assert rot["n"].iloc[0] == 3  # nothing recorded: counted, as folders from before the record


def test_two_machines_run_lists_pool_into_pairs_of_machine_and_seed(tmp_path, capsys):
    import subprocess
    import sys

    from orchestrate import precision

    profile = fake_runs(tmp_path)
    runs = collect_runs(profile.runs_root)
    a, b = tmp_path / "xeon", tmp_path / "epyc"
    for folder, lift in ((a, 0.0), (b, 0.02)):  # the second machine: bf16 CE 2 mAP higher
        folder.mkdir()
        shifted = runs.copy()
        bf16 = (shifted["variant"] == "ce_bf16") & (shifted["task"] == "frozen")
        shifted.loc[bf16, "m.svm_best_mAP"] += lift
        shifted.to_csv(folder / "runs.csv", index=False)
    out = tmp_path / "pooled"
    argv = ["--profile", str(tmp_path / "fake_precision.yaml"), "--out", str(out), str(a), str(b)]
    precision.main([*argv, "--names", "Xeon", "EPYC"])
    table = pd.read_csv(out / "precision_pooled.csv")
    ce = table[table["compared"] == "pretext: CE bf16 vs CE fp32"].set_index("metric")
    mean, low, high = paired([1.0, 3.0, 0.0, 3.0, 5.0, 2.0])  # seeds 0-2, then 100-102
    svm = ce.loc["frozen SVM best layer, mAP"]
    assert svm["n"] == 6 and (svm["diff"], svm["ci_low"], svm["ci_high"]) == pytest.approx(
        (mean, low, high)
    )
    assert not any(m.startswith("pretext loss") for m in ce.index)  # no run folders: no losses
    text = (out / "precision_pooled.md").read_text()
    assert f"seeds 0+ from `{a}` (Xeon)" in text and f"seeds 100+ from `{b}` (EPYC)" in text
    # a folder without a run list: one error line, exit 2
    (tmp_path / "empty").mkdir()
    bad = [*argv[:4], str(a), str(tmp_path / "empty")]
    proc = subprocess.run([sys.executable, "-m", "orchestrate.precision", *bad],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.splitlines()) == 1 and "runs.csv: no run list" in proc.stderr
    from core.cli import UserError

    with pytest.raises(UserError, match="--names: 1 names for 2 folders"):
        precision.main([*argv, "--names", "Xeon"])
    builtin = ["--profile", "builtin", "--out", str(out), str(a)]  # no amp pairs in it
    with pytest.raises(UserError, match="builtin: no precision pair with runs"):
        precision.main(builtin)
