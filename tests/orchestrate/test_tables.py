"""Table building from hand-written run records, including a missing and a failed run."""

import json

import pytest
from scipy import stats

from orchestrate.tables import (
    TABLE2_COLUMNS,
    build_table,
    collect_runs,
    difference_ci,
    format_cell,
    format_difference,
    to_markdown,
)


def record(root, stage, task, variant, seed, status="done", result=None):
    run_dir = root / stage / task / variant / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(
        json.dumps(
            {"stage": stage, "task": task, "variant": variant, "seed": seed, "status": status}
        )
    )
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


@pytest.fixture()
def runs(tmp_path):
    for seed, m in enumerate([0.50, 0.60, 0.70]):
        record(tmp_path, "transfer", "classify", "context_encoder", seed, result={"mAP": m})
    record(tmp_path, "transfer", "classify", "random_init", 0, result={"mAP": 0.30})
    record(tmp_path, "transfer", "classify", "random_init", 1, result={"mAP": 0.40})
    record(tmp_path, "transfer", "classify", "random_init", 2, status="failed")  # failed run
    record(tmp_path, "transfer", "classify", "autoencoder", 0, status="running")  # missing result
    record(tmp_path, "transfer", "detect", "context_encoder", 0, result={"mAP": 0.25})
    record(tmp_path, "pretext", "pretext", "context_encoder", 0, result={"train_time_s": 120.0})
    record(tmp_path, "pretext", "pretext", "context_encoder", 1, result={"train_time_s": 180.0})
    return collect_runs(tmp_path)


def test_collect_runs_reads_status_and_metrics(runs):
    assert len(runs) == 10
    assert (runs["status"] == "done").sum() == 8
    assert set(runs[runs["status"] != "done"]["status"]) == {"failed", "running"}


def test_table2_cells_exactly(runs):
    rows = [
        ("Random init", "random_init"),
        ("Autoencoder", "autoencoder"),
        ("Context encoder", "context_encoder"),
    ]
    table, long = build_table(runs, TABLE2_COLUMNS, rows)
    cls, svm, knn, det, seg, time = (c.title for c in TABLE2_COLUMNS)
    by = table.set_index("Method")
    assert by.loc["Context encoder", cls] == "60.0 ± 10.0 (n=3)"
    assert by.loc["Random init", cls] == "35.0 ± 7.1 (n=2/3)"  # one failed run out of three
    assert by.loc["Autoencoder", cls] == "—"  # a run without a result: no value
    assert by.loc["Context encoder", det] == "25.0 (n=1)"
    assert by.loc["Context encoder", seg] == "—"
    assert by.loc["Context encoder", svm] == "—"  # no eval/frozen records
    assert by.loc["Context encoder", knn] == "—"
    assert by.loc["Context encoder", time] == "2.50 ± 0.71 (n=2)"
    row = long[(long["row"] == "Random init") & (long["column"] == cls)].iloc[0]
    assert (row["n"], row["expected"], row["failed"]) == (2, 3, 1)
    assert row["runs"].count("seed") == 2 and "seed2" not in row["runs"]


def test_format_cell_and_markdown():
    assert format_cell([1.0, 3.0], 1, 2) == "2.0 ± 1.4 (n=2)"
    assert format_cell([], 1, 3) == "—"
    import pandas as pd

    md = to_markdown(pd.DataFrame({"a": [1], "b": ["x"]}))
    assert md == "| a | b |\n| --- | --- |\n| 1 | x |\n"


def test_bad_run_json_names_the_file(tmp_path):
    bad = tmp_path / "x" / "run.json"
    bad.parent.mkdir()
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"x/run.json: not valid JSON"):
        collect_runs(tmp_path)


def test_table1_rows_read_prefixed_metrics_of_one_run(tmp_path):
    from orchestrate.tables import TABLE1_COLUMNS

    result = {
        "mean_fill/l1": 0.2,
        "mean_fill/l2": 0.05,
        "mean_fill/psnr": 13.0,
        "ce_l2/psnr": 17.25,
        "mean_fill/psnr_pooled_hole": 12.5,
        "mean_fill/l1_center": 0.15,
        "mean_fill/l2_center": 0.04,
        "mean_fill/psnr_center": 14.0,
    }
    record(tmp_path, "eval", "inpainting", "all", 0, result=result)
    rows = [("Mean fill", "all", "mean_fill/"), ("CE", "all", "ce_l2/")]
    table, _ = build_table(collect_runs(tmp_path), TABLE1_COLUMNS, rows)
    by = table.set_index("Method")
    assert list(by.loc["Mean fill"]) == [
        "20.00 (n=1)", "5.00 (n=1)", "13.00 (n=1)", "12.50 (n=1)",
        "15.00 (n=1)", "4.00 (n=1)", "14.00 (n=1)",
    ]  # fmt: skip
    assert list(by.loc["CE"]) == ["—", "—", "17.25 (n=1)", "—", "—", "—", "—"]


def test_paired_difference_by_hand():
    """d = (20, 20, 25): mean 21.667, sd 2.8868, se 1.6667, t_{0.975, 2} = 4.3027 -> ± 7.171."""
    d = difference_ci({0: 50.0, 1: 60.0, 2: 70.0}, {0: 30.0, 1: 40.0, 2: 45.0})
    assert d.test == "paired" and d.n == 3
    assert (round(d.diff, 3), round(d.low, 2), round(d.high, 2)) == (21.667, 14.50, 28.84)
    assert d.significant and format_difference(d, 1) == "Δ +21.7 [+14.5, +28.8]*"
    ref = stats.ttest_rel([50, 60, 70], [30, 40, 45]).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))


def test_welch_difference_when_seeds_differ():
    values, base = {0: 50.0, 1: 60.0, 2: 70.0}, {0: 30.0, 1: 50.0}
    d = difference_ci(values, base)
    ref = stats.ttest_ind([50, 60, 70], [30, 50], equal_var=False).confidence_interval(0.95)
    assert d.test == "welch" and d.diff == pytest.approx(20.0)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert d.low < 0 < d.high and not d.significant  # se 11.5, dof 1.68: the interval holds 0
    assert format_difference(d, 1).endswith("]") and "*" not in format_difference(d, 1)


def test_difference_without_interval_and_without_runs():
    d = difference_ci({0: 5.0}, {0: 3.0, 1: 4.0})
    assert d.test == "none" and d.diff == 1.5 and format_difference(d, 1) == "Δ +1.5"
    assert not d.significant
    assert difference_ci({}, {0: 1.0}) is None


def test_table2_marks_differences_to_the_baseline(runs):
    rows = [("Random init", "random_init"), ("Context encoder", "context_encoder")]
    table, long = build_table(runs, TABLE2_COLUMNS, rows, baseline="random_init")
    cls, time = TABLE2_COLUMNS[0].title, TABLE2_COLUMNS[-1].title
    by = table.set_index("Method")
    assert by.loc["Random init", cls] == "35.0 ± 7.1 (n=2/3)"  # the baseline: no difference
    # context encoder seeds {0, 1, 2} vs random init {0, 1} (seed 2 failed): Welch
    ref = stats.ttest_ind([50, 60, 70], [30, 40], equal_var=False).confidence_interval(0.95)
    assert 0 < ref.low < 0.2  # just excludes 0: starred
    expected = f"60.0 ± 10.0 (n=3); Δ +25.0 [{ref.low:+.1f}, {ref.high:+.1f}]*"
    assert by.loc["Context encoder", cls] == expected
    assert by.loc["Context encoder", time] == "2.50 ± 0.71 (n=2)"  # compare=False: no Δ
    row = long[(long["row"] == "Context encoder") & (long["column"] == cls)].iloc[0]
    assert row["test"] == "welch" and row["significant"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref.low, ref.high))


def test_paired_significant_cell_is_starred(tmp_path):
    for seed, (a, b) in enumerate([(0.50, 0.30), (0.60, 0.41), (0.70, 0.49)]):
        record(tmp_path, "eval", "frozen", "context_encoder", seed, result={"svm_best_mAP": a})
        record(tmp_path, "eval", "frozen", "random_init", seed, result={"svm_best_mAP": b})
    rows = [("Random init", "random_init"), ("Context encoder", "context_encoder")]
    table, long = build_table(collect_runs(tmp_path), TABLE2_COLUMNS, rows, "random_init")
    svm = TABLE2_COLUMNS[1].title
    ref = stats.ttest_rel([50, 60, 70], [30, 41, 49]).confidence_interval(0.95)
    cell = table.set_index("Method").loc["Context encoder", svm]
    assert cell == f"60.0 ± 10.0 (n=3); Δ +20.0 [{ref.low:+.1f}, {ref.high:+.1f}]*"
    assert ref.low > 0
