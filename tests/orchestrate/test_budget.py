"""The budget profile's job graph (counted by hand) and its figure / table / crossings from
hand-written run records (orchestrate/budget.py)."""

from pathlib import Path

import pandas as pd
import pytest
from recorded_runs import fake_profile, record

from core.atomic_io import append_jsonl
from orchestrate.budget import write_budget
from orchestrate.jobs import expand
from orchestrate.profile import load_profile, profile_path
from orchestrate.tables import collect_runs

T_975_2 = 4.302653  # t quantile, 2 degrees of freedom (3 paired seeds)


def test_budget_profile_expands_to_the_jobs_counted_by_hand():
    profile = load_profile(profile_path("budget"))
    jobs = expand(profile)
    pretext = [j for j in jobs if j.stage == "pretext"]
    frozen = [j for j in jobs if j.task == "frozen"]
    # (2 training-free + the context encoder x 3 budgets + 3 methods x 2) variants x 3 seeds, one frozen job each
    assert (len(pretext), len(frozen), len(jobs)) == (11 * 3, 11 * 3, 66)
    ce = next(j for j in pretext if j.variant == "context_encoder,optim.steps=1600" and j.seed == 2)
    assert "optim.steps=1600" in ce.argv and "probe.every=200" in ce.argv
    assert ce.run_dir == "runs/budget/pretext/context_encoder,optim.steps=1600/seed2"
    rand = next(j for j in pretext if j.variant == "random_init")
    assert not any(a.startswith(("probe.", "optim.steps")) for a in rand.argv)
    deps = {j.deps for j in frozen if j.variant == "rotation,optim.steps=100" and j.seed == 1}
    assert deps == {("runs/budget/pretext/rotation,optim.steps=100/seed1",)}
    steps = {j.variant.split("=")[-1] for j in pretext if "," in j.variant}
    assert steps == {"100", "400", "1600"}


# the profile after recorded_runs.HEAD
PROFILE = """\
  variants:
    random_init: {{title: "Random initialization", overrides: [method=random_init]}}
    kmeans_init: {{title: "k-means init"}}
    ce: {{title: "Context encoder", overrides: [probe.every=200], grid: {{optim.steps: [100, 400]}}}}
eval:
  frozen:
    module: eval.frozen
    variants: [random_init, kmeans_init, ce]
"""
# frozen SVM test mAP per seed (fractions): best layer, conv5
FROZEN = {
    "random_init": ([0.30, 0.32, 0.34], [0.30, 0.31, 0.32]),
    "kmeans_init": ([0.50, 0.52, 0.54], [0.40, 0.40, 0.40]),
    "ce,optim.steps=100": ([0.29, 0.35, 0.33], [0.28, 0.29, 0.30]),  # Δ -1 +3 -1; -2 -2 -2
    "ce,optim.steps=400": ([0.35, 0.38, 0.39], [0.29, 0.31, 0.30]),  # Δ +5 +6 +5; -1 0 -2
}


def fake_runs(tmp_path):
    """The profile's run folders as the pipeline leaves them (run.json, result.json, the pretext
    runs' config.yaml with batch size 8 and the probe's metrics.jsonl lines)."""
    profile = fake_profile(tmp_path, "fake_budget", PROFILE)
    for job in expand(profile):
        if job.stage == "pretext":
            steps = int(job.variant.split("=")[1]) if "," in job.variant else 0
            run_dir = record(job, {"steps": steps})
            (run_dir / "config.yaml").write_text("optim:\n  batch_size: 8\n")
            for s in range(0, steps + 1, 200) if steps else ():
                append_jsonl(run_dir / "metrics.jsonl", {"step": s, "images_seen": 8 * s,
                             "probe/knn_conv5_mAP": 0.2 + s / 4000 + 0.01 * job.seed})  # fmt: skip
        else:
            best, conv5 = FROZEN[job.variant]
            record(job, {"svm_best_mAP": best[job.seed], "svm_conv5_mAP": conv5[job.seed]})
    return profile


def test_budget_figure_table_and_crossings_from_recorded_runs(tmp_path):
    profile = fake_runs(tmp_path)
    out = Path(profile.results_dir)
    lines = write_budget(collect_runs(profile.runs_root), profile, out)
    assert (out / "figures" / "pretext_budget.png").stat().st_size > 10_000
    assert (out / "figures" / "pretext_budget_probe.png").stat().st_size > 10_000
    table = pd.read_csv(out / "pretext_budget.csv").set_index(["method", "steps"])
    assert list(table.index) == [("random_init", 0), ("kmeans_init", 0), ("ce", 100), ("ce", 400)]
    ce400 = table.loc[("ce", 400)]
    assert ce400["images_seen"] == 3200 and ce400["n"] == 3
    assert ce400["svm_best_mAP_mean"] == pytest.approx(112 / 3)  # (35 + 38 + 39) / 3
    # paired differences 5, 6, 5: mean 16/3, sd sqrt(1/3), half-width t * sd / sqrt(3) = t / 3
    assert ce400["svm_best_mAP_delta"] == pytest.approx(16 / 3)
    assert ce400["svm_best_mAP_low"] == pytest.approx(16 / 3 - T_975_2 / 3, abs=1e-5)
    assert (
        table.loc[("ce", 100), "svm_best_mAP_low"] < 0 < table.loc[("ce", 100), "svm_best_mAP_high"]
    )
    assert table.loc[("ce", 100), "svm_conv5_mAP_high"] == pytest.approx(-2.0)  # below, not above
    assert table.loc[("kmeans_init", 0), "svm_best_mAP_delta"] == pytest.approx(20.0)
    assert pd.isna(table.loc[("random_init", 0), "svm_best_mAP_delta"])
    md = (out / "pretext_budget.md").read_text()
    assert (
        "- Context encoder, Frozen SVM, best layer: crosses random init at 400 steps (3200 images)"
        in md
    )
    assert ("- Context encoder, Frozen SVM, conv5: does not cross random init within the budgets "
            "tried (100, 400 steps)") in md  # fmt: skip
    assert "| Context encoder | 400 | 3200 | 3 | 37.3 ± 2.1 (Δ +5.3 [+3.9, +6.8]*) |" in md
    assert "| Random initialization | 0 | 0 | 3 | 32.0 ± 2.0 | 31.0 ± 1.0 |" in md
    assert lines and lines[0].startswith("## Pretext budget")


def test_a_profile_without_budgets_writes_nothing(tmp_path):
    profile = fake_runs(tmp_path)
    profile.eval["frozen"].variants = ["random_init", "kmeans_init"]
    assert write_budget(collect_runs(profile.runs_root), profile, Path(profile.results_dir)) == []
    assert not (Path(profile.results_dir) / "pretext_budget.md").exists()


def test_the_report_of_a_budget_profile_carries_its_section(tmp_path):
    from orchestrate.report import write_report

    out = write_report(fake_runs(tmp_path), 1.0, "make table PROFILE=budget")
    readme = (out / "README.md").read_text()
    assert "## Pretext budget" in readme and "crosses random init at 400 steps" in readme
    assert readme.index("## Pretext budget") < readme.index("## Provenance")
    assert (out / "figures" / "pretext_budget.png").is_file()
