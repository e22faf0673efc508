"""Resolution of a table against oracles: the minimum detectable difference (power at 0 is alpha,
a simulation at the MDE, the textbook formula at large n), seeds for a ±2 interval and the pooled
std by hand, the per-image test scores the protocols record (they reproduce result.json), the
resampled mAP against core.voc_ap, and the seeds + test images interval (hand case, identical
methods, a known test-image variance, coverage by simulation)."""

import json

import numpy as np
import pytest
from scipy import stats

from core import image_scores
from core.voc_ap import mean_ap, voc07_classification_ap
from eval import frozen
from orchestrate.tables import (
    TABLE2_COLUMNS,
    ImageBootstrap,
    build_table,
    ci_half_width,
    collect_runs,
    combined_interval,
    min_detectable_difference,
    paired_t_power,
    pooled_sd,
    resolution_table,
    seeds_for_half_width,
)


def rejection_rate(delta: float, n: int, trials: int = 200_000, seed: int = 0) -> float:
    """Monte Carlo power of the two-sided 5% paired t-test: d_s ~ N(delta, 1), s = 1..n."""
    d = np.random.default_rng(seed).normal(delta, 1.0, (trials, n))
    t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
    return float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))


def test_power_is_alpha_at_zero_difference():
    for n in (2, 3, 10):
        assert paired_t_power(0.0, 1.0, n) == pytest.approx(0.05, abs=1e-9)


def test_mde_at_three_seeds_has_80_percent_power_in_simulation():
    mde = min_detectable_difference(1.0, 3)
    assert mde == pytest.approx(3.2640, abs=1e-3)  # exact noncentral t
    assert rejection_rate(mde, 3) == pytest.approx(0.80, abs=0.005)  # SE 0.0009
    # the textbook (t_{.975,2} + t_{.8,2}) / sqrt(3) = (4.3027 + 1.0607) / 1.7321 = 3.0965 sd falls
    # short of 80% power at n = 3
    textbook = (4.302653 + 1.060660) / np.sqrt(3)
    assert textbook == pytest.approx(3.0965, abs=1e-4) and rejection_rate(textbook, 3) < 0.78
    assert min_detectable_difference(2.32, 3) == pytest.approx(2.32 * mde)  # linear in sd


def test_mde_at_many_seeds_is_the_textbook_formula():
    # n = 100: t_{.975, 99} = 1.98422, t_{.80, 99} = 0.84542 -> (1.98422 + 0.84542) / 10 = 0.28296
    assert min_detectable_difference(1.0, 100) == pytest.approx(0.28296, rel=1e-3)
    assert np.isnan(min_detectable_difference(1.0, 1)) and min_detectable_difference(0.0, 3) == 0


def test_seeds_for_a_two_point_half_width_by_hand():
    # sd 2.2: n = 7 -> t_{.975,6} 2.4469 x 2.2 / sqrt(7) = 2.035 > 2; n = 8 -> 2.3646 x 2.2 /
    # sqrt(8) = 1.839 <= 2
    assert ci_half_width(2.2, 7) == pytest.approx(2.0346, abs=1e-3)
    assert ci_half_width(2.2, 8) == pytest.approx(1.8392, abs=1e-3)
    assert seeds_for_half_width(2.2, 2.0) == 8
    assert seeds_for_half_width(0.0, 2.0) == 2 and seeds_for_half_width(float("nan"), 2.0) is None
    assert seeds_for_half_width(1e6, 2.0, max_n=50) is None


def test_pooled_sd_by_hand():
    # variances 1 and 4, two degrees of freedom each: sqrt((2 x 1 + 2 x 4) / 4) = sqrt(2.5)
    sd, dof = pooled_sd([np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]), np.array([9.0])])
    assert dof == 4 and sd == pytest.approx(np.sqrt(2.5))
    assert np.isnan(pooled_sd([np.array([1.0])])[0])


def record(root, stage, task, variant, seed, result, scores=None):
    run_dir = root / stage / task / variant / f"seed{seed}"
    run_dir.mkdir(parents=True)
    info = {"stage": stage, "task": task, "variant": variant, "seed": seed, "status": "done"}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "result.json").write_text(json.dumps(result))
    if scores is not None:
        image_scores.save(run_dir, *scores)
    return run_dir


def test_resolution_table_pools_the_self_supervised_rows(tmp_path):
    # paired differences to random init: ae (1, 2, 3) var 1, ce (2, 4, 6) var 4; supervised far
    # off and not pooled
    diffs = {"autoencoder": [1, 2, 3], "context_encoder": [2, 4, 6], "supervised": [10, 30, 20]}
    for seed in range(3):
        base = 0.30 + 0.01 * seed
        record(tmp_path, "eval", "frozen", "random_init", seed, {"svm_best_mAP": base})
        for variant, d in diffs.items():
            result = {"svm_best_mAP": base + d[seed] / 100}
            record(tmp_path, "eval", "frozen", variant, seed, result)
    rows = [("Random", "random_init"), ("AE", "autoencoder"), ("CE", "context_encoder"),
            ("Sup", "supervised")]  # fmt: skip
    res = resolution_table(collect_runs(tmp_path), TABLE2_COLUMNS, rows, "random_init",
                           pooled=["autoencoder", "context_encoder"])  # fmt: skip
    svm = res.set_index("column").loc[TABLE2_COLUMNS[1].title]
    assert (svm["rows"], svm["n"], svm["dof"]) == ("AE; CE", 3, 4)
    assert svm["pooled_sd"] == pytest.approx(np.sqrt(2.5))
    assert svm["mde"] == pytest.approx(3.2640 * np.sqrt(2.5), rel=1e-4)
    # half-width 4.3027 sqrt(2.5) / sqrt(3) = 3.928; ±2: n = 4 gives 3.1824 sqrt(2.5 / 4) = 2.516,
    # n = 5 gives 2.7764 sqrt(2.5 / 5) = 1.963
    assert svm["ci_half_width"] == pytest.approx(3.928, abs=1e-3)
    assert svm["seeds_for_target"] == 5
    cls = res.set_index("column").loc[TABLE2_COLUMNS[0].title]  # no runs: nothing to pool
    assert cls["dof"] == 0 and np.isnan(cls["mde"])
    assert TABLE2_COLUMNS[-1].title not in set(res["column"])  # compare=False: no line


# ---- per-image scores ------------------------------------------------------------------------


def test_resampled_maps_equal_core_voc_ap_on_each_resample():
    """Ties, difficult-only entries, repeated rows and a class with no classifier (NaN)."""
    rng = np.random.default_rng(0)
    m, c = 60, 5
    labels = (rng.random((m, c)) < 0.3).astype(np.float32)
    difficult = ((rng.random((m, c)) < 0.1) & (labels > 0)).astype(np.float32)
    scores = np.round(rng.normal(size=(m, c)) + labels, 1)
    scores[:, 4] = np.nan
    index = rng.integers(0, m, (40, m))
    for mode in ("11points", "area"):
        arrays = {"labels": labels, "difficult_only": difficult, "ap_mode": np.asarray(mode),
                  "s": scores}  # fmt: skip
        got = image_scores.resampled_maps(arrays, "s", index)
        ref = [mean_ap(voc07_classification_ap(scores[r][:, :4], labels[r][:, :4],
                                               difficult[r][:, :4], mode)) for r in index]  # fmt: skip
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_frozen_records_scores_that_reproduce_its_result(tiny_voc, tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    argv = [f"checkpoint={tiny_ckpt}", f"data={tiny_voc}", f"run_dir={run}",
            f"cache_dir={tmp_path / 'cache'}", "svm.costs=[0.1,1.0]", "knn.k=5",
            "lowshot.k=[]"]  # fmt: skip
    result = frozen.main(frozen.parse_config(argv))
    arrays = image_scores.load(run)
    test_ids = (tiny_voc / "ImageSets" / "Main" / "test.txt").read_text().split()
    assert list(arrays["ids"]) == test_ids and arrays["labels"].shape == (len(test_ids), 8)
    metrics = [k for k in arrays if k not in image_scores.META_KEYS]
    assert sorted(metrics) == sorted(
        [f"svm_{x}_mAP" for x in frozen.LAYERS] + [f"knn_{x}_mAP" for x in frozen.LAYERS]
        + ["svm_best_mAP", "knn_mAP"]
    )  # fmt: skip
    for key in metrics:
        got = image_scores.voc07_map(arrays[key], arrays["labels"], arrays["difficult_only"],
                                     str(arrays["ap_mode"]))  # fmt: skip
        assert got == result[key], key  # the very number result.json reports


def test_identical_methods_give_the_seed_interval_around_zero(tmp_path):
    """The same three runs under two names, seeds permuted: every resample's mean difference is
    exactly 0, so the interval is the paired t-interval of the per-seed differences."""
    rng = np.random.default_rng(1)
    n_img, classes = 80, 3
    labels = (rng.random((n_img, classes)) < 0.4).astype(np.float32)
    ids = [f"{i:06d}" for i in range(n_img)]
    runs = []
    for seed in range(3):
        s = labels + rng.normal(0, 0.8 + 0.3 * seed, labels.shape)
        runs.append((s, image_scores.voc07_map(s, labels, 0 * labels, "11points")))
    for seed in range(3):
        for variant, (s, value) in (("random_init", runs[seed]), ("ae", runs[(seed + 1) % 3])):
            scores = (ids, labels, 0 * labels, "11points", {"svm_best_mAP": s})
            record(tmp_path, "eval", "frozen", variant, seed, {"svm_best_mAP": value}, scores)
    rows = [("Random", "random_init"), ("AE", "ae")]
    table, long = build_table(collect_runs(tmp_path), TABLE2_COLUMNS[1:2], rows, "random_init",
                              ImageBootstrap(200))  # fmt: skip
    cell = long[long["row"] == "AE"].iloc[0]
    assert cell["image_var"] == 0  # every resample's mean difference is 0: nothing shared
    d = [100 * (runs[(s + 1) % 3][1] - runs[s][1]) for s in range(3)]
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (cell["comb_low"], cell["comb_high"]) == pytest.approx((ref.low, ref.high))
    assert cell["comb_low"] < 0 < cell["comb_high"] and not cell["comb_significant"]
    text = table.set_index("Method").loc["AE", TABLE2_COLUMNS[1].title]
    assert f"; seeds+images [{ref.low:+.1f}, {ref.high:+.1f}]" in text
    # without the bootstrap, or when a run has no scores, the cell is the seed interval alone
    plain, _ = build_table(collect_runs(tmp_path), TABLE2_COLUMNS[1:2], rows, "random_init")
    assert "seeds+images" not in plain.set_index("Method").loc["AE", TABLE2_COLUMNS[1].title]


def test_scores_that_do_not_reproduce_the_result_are_refused(tmp_path):
    labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 5]
    scores = (list(map(str, range(20))), labels, 0 * labels, "11points", {"svm_best_mAP": labels})
    for seed in range(2):
        record(tmp_path, "eval", "frozen", "random_init", seed, {"svm_best_mAP": 1.0}, scores)
        bad = record(tmp_path, "eval", "frozen", "ae", seed, {"svm_best_mAP": 0.5}, scores)
    rows = [("Random", "random_init"), ("AE", "ae")]
    with pytest.raises(ValueError, match=rf"{bad.parent.name}/seed\d/scores.npz: svm_best_mAP"):
        build_table(collect_runs(tmp_path), TABLE2_COLUMNS[1:2], rows, "random_init",
                    ImageBootstrap(50))  # fmt: skip


def test_bootstrap_variance_matches_fresh_test_sets():
    """Two fixed scorers of an image's labels and its own noise: the bootstrap variance of their
    mAP difference on one test set of 150 images ~ its variance over 400 fresh test sets."""
    rng = np.random.default_rng(2)
    n_img, classes = 150, 4

    def test_set():
        labels = (rng.random((n_img, classes)) < 0.3).astype(np.float32)
        noise = rng.normal(size=(2, n_img, classes))
        return labels, labels * 1.5 + noise[0], labels * 1.0 + noise[1]

    def diff(labels, a, b):
        zero = 0 * labels
        return image_scores.voc07_map(a, labels, zero, "11points") - image_scores.voc07_map(
            b, labels, zero, "11points"
        )

    fresh = np.var([diff(*test_set()) for _ in range(400)], ddof=1)
    boot = []
    for _ in range(4):
        labels, a, b = test_set()
        arrays = {"labels": labels, "difficult_only": 0 * labels, "ap_mode": np.asarray("11points"),
                  "a": a, "b": b}  # fmt: skip
        index = ImageBootstrap(1000, seed=3).index(n_img)
        resampled = image_scores.resampled_maps(arrays, "a", index) - image_scores.resampled_maps(
            arrays, "b", index
        )
        boot.append(np.var(resampled, ddof=1))
    assert np.mean(boot) == pytest.approx(fresh, rel=0.25)


def test_combined_interval_by_hand():
    """d = (1, 2, 3): a = 1 / 3. Every seed's replicates 2 -+ sqrt(1/6): all shared by the seeds,
    b = 1 / 3. Half-width sqrt(4.3027^2 / 3 + 1.9600^2 / 3) = sqrt(6.1710 + 1.2805) = 2.7297: a
    constant shift of 2 seen through both noises, the interval around it."""
    x = np.sqrt(1 / 6)
    c = combined_interval(np.array([1.0, 2.0, 3.0]), np.tile([2 - x, 2 + x], (3, 1)))
    assert (c.seed_var, c.image_var) == pytest.approx((1 / 3, 1 / 3))
    assert (c.low, c.high) == pytest.approx((2 - 2.7297, 2 + 2.7297), abs=1e-4)
    assert not c.significant
    # image noise of each seed's own (uncorrelated between seeds): already in the seeds' spread,
    # nothing is added and the interval is the paired t-interval
    own = np.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    shifted = combined_interval(np.array([5.0, 5.5, 6.0]), 5.5 + own)
    ref = stats.ttest_1samp([5.0, 5.5, 6.0], 0.0).confidence_interval(0.95)
    assert shifted.image_var == 0 and shifted.significant
    assert (shifted.low, shifted.high) == pytest.approx((ref.low, ref.high))


def simulated(s_seed, s_image, s_inter, trials=4000, n=3, resamples=200, seed=0):
    """d_s = e_s + g + h_s over n seeds (seed effect e, test-set effect g shared by the seeds,
    seed x image h; the true difference is 0) and bootstrap replicates d_s + g* + h_s* with the
    same image variances: (d [trials, n], replicates [trials, n, resamples])."""
    rng = np.random.default_rng(seed)
    d = (rng.normal(0, s_seed, (trials, n)) + rng.normal(0, s_image, (trials, 1))
         + rng.normal(0, s_inter, (trials, n)))  # fmt: skip
    reps = (d[:, :, None] + rng.normal(0, s_image, (trials, 1, resamples))
            + rng.normal(0, s_inter, (trials, n, resamples)))  # fmt: skip
    return d, reps


# (seed, shared image, seed x image) std: five mixes, and the two measured on the built-in table
# (docs/measurements.md, "Seeds and test images"): fine-tuned classification, context encoder
# frozen SVM
MIXES = [(2.0, 0.3, 0.3), (1.0, 0.8, 0.8), (0.2, 1.5, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0),
         (0.3, 0.35, 0.9), (2.1, 0.63, 1.43)]  # fmt: skip


@pytest.mark.parametrize("s_seed,s_image,s_inter", MIXES)
def test_combined_interval_covers_the_true_difference(s_seed, s_image, s_inter):
    d, reps = simulated(s_seed, s_image, s_inter)
    covered = [(c.low <= 0 <= c.high) for c in map(combined_interval, d, reps)]
    assert np.mean(covered) >= 0.94


def test_satterthwaite_would_narrow_and_undercover_when_seeds_dominate():
    """Why the parts are added in quadrature: t_nu sqrt(a + b) with Welch-Satterthwaite nu is
    narrower, and covers < 94% at n = 3 when the seed variance dominates."""
    d, reps = simulated(2.0, 0.3, 0.3)
    covered = []
    for c, row in zip(map(combined_interval, d, reps), d):
        a, b = c.seed_var, c.image_var
        nu = (a + b) ** 2 / (a**2 / 2)
        covered.append(abs(row.mean()) <= stats.t.ppf(0.975, nu) * np.sqrt(a + b))
    assert np.mean(covered) < 0.94


def test_runs_scored_on_other_test_images_get_no_image_interval(tmp_path):
    labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 5]
    for seed in range(2):
        for variant, first in (("random_init", "a"), ("ae", "b")):  # other image ids
            ids = [f"{first}{i}" for i in range(20)]
            scores = (ids, labels, 0 * labels, "11points", {"svm_best_mAP": labels})
            record(tmp_path, "eval", "frozen", variant, seed, {"svm_best_mAP": 1.0}, scores)
    runs = collect_runs(tmp_path)
    boot = ImageBootstrap(50)
    by = {v: {s: (str(tmp_path / "eval" / "frozen" / v / f"seed{s}"), 1.0) for s in range(2)}
          for v in ("random_init", "ae")}  # fmt: skip
    assert boot.differences(by["ae"], by["random_init"], "svm_best_mAP") is None
    rows = [("Random", "random_init"), ("AE", "ae")]
    _, long = build_table(runs, TABLE2_COLUMNS[1:2], rows, "random_init", boot)
    assert "comb_low" not in long.columns  # paired by seed, not by image: seed interval only
