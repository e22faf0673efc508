"""Frozen-feature protocols (eval/frozen.py) against oracles: VISSL's pooling dimensions, the SVM
solver against sklearn's LinearSVC, a separable bank (AP 1), label-free features (AP = prior), a kNN
bank with known votes, and one whole stage on the tiny mini-VOC (cache and resume)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from core import features
from core.features import pool_spec, pooling_for
from core.knn import knn_scores
from core.models import build_model
from core.voc_ap import mean_ap, voc07_classification_ap
from eval import frozen
from eval.frozen import Config
from eval.svm import LowShotConfig, SVMConfig, fit_l2svm, lowshot_layer, lowshot_rows, svm_layer

# VISSL, eval_alexnet_8gpu_transfer_voc07_svm.yaml: conv1 k19 s4, conv2 k12 s3, conv3-4 k9 s1,
# conv5 k8 s1 -> 9600 / 9216 / 9600 / 9600 / 9216 dimensions at 227 px.
VISSL_227 = {"conv1": (19, 4), "conv2": (12, 3), "conv3": (9, 1), "conv4": (9, 1), "conv5": (8, 1)}
VISSL_227_DIMS = {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216}
# small64 (64 px; maps 32x32x48, 16x16x96, 8x8x128, 8x8x128, 8x8x96; pool5 4x4x96): the same rule,
# capped at the map size for conv3..conv5.
SMALL64_DIMS = {"conv1": 9408, "conv2": 9600, "conv3": 8192, "conv4": 8192, "conv5": 6144,
                "bottleneck": 1536}  # fmt: skip


def dims_of(arch: str) -> dict[str, int]:
    model = build_model(arch, output="center" if arch == "inpaint128" else "full").eval()
    pooling = pooling_for(model, features.TARGET_DIM)
    x = torch.zeros(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        maps = features.conv_maps(model, x)
    return {
        k: features.pool_and_flatten(v, pooling[k]).shape[1]
        for k, v in maps.items()
        if k in pooling
    }, pooling


def test_pooling_reproduces_vissl_alexnet_227():
    dims, pooling = dims_of("alexnet227")
    assert {k: pooling[k] for k in VISSL_227} == VISSL_227
    assert {k: dims[k] for k in VISSL_227_DIMS} == VISSL_227_DIMS
    assert dims["bottleneck"] == 256 * 6 * 6 and pooling["bottleneck"] is None


def test_pooling_dims_small64_and_inpaint128():
    dims, _ = dims_of("small64")
    assert dims == SMALL64_DIMS
    dims, _ = dims_of("inpaint128")  # DCGAN encoder: 64x64x64 ... 4x4x512, 4000-d bottleneck
    assert list(dims) == ["conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck"]
    assert dims["bottleneck"] == 4000 and dims["conv5"] == 512 * 4 * 4
    assert all(d <= 9216 * 1.1 for d in dims.values())


@pytest.mark.parametrize(
    "size,channels", [(55, 96), (27, 256), (13, 384), (8, 128), (3, 7), (1, 9)]
)
def test_pool_spec_output_side(size, channels):
    kernel, stride = pool_spec(size, channels)
    side = (size - kernel) // stride + 1
    assert side == min(size, max(1, round(math.sqrt(9216 / channels))))


def test_newton_svm_equals_sklearn_linearsvc():
    """Same objective (squared hinge, L2, class weights {+1: 2, -1: 1}, bias as a feature)."""
    rng = np.random.default_rng(0)
    y = np.where(np.arange(90) % 3 == 0, 1, -1)
    x = rng.normal(size=(90, 40)) + 0.5 * (y > 0)[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for cost in (0.01, 1.0, 100.0):
        ref = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, tol=1e-10, max_iter=10**6,
                        random_state=0).fit(x, y)  # fmt: skip
        beta = fit_l2svm(x @ x.T + 1, y, cost)
        np.testing.assert_allclose((x @ x.T + 1) @ beta, ref.decision_function(x), atol=1e-5)


def multilabel_bank(n: int, classes: int, rng, separable: bool):
    """Features [n, 64] and labels [n, classes]: each image has 1-2 classes; separable features
    are the sum of their classes' orthogonal directions (+ tiny noise), else pure noise."""
    labels = np.zeros((n, classes))
    labels[np.arange(n), rng.integers(0, classes, n)] = 1
    second = rng.random(n) < 0.3
    labels[np.flatnonzero(second), rng.integers(0, classes, second.sum())] = 1
    noise = rng.normal(size=(n, 64))
    if not separable:
        return noise.astype(np.float32), labels
    return (labels @ np.eye(classes, 64) * 5 + 0.1 * noise).astype(np.float32), labels


def test_svm_separable_bank_gives_ap_one():
    rng = np.random.default_rng(1)
    x, y = multilabel_bank(240, 4, rng, separable=True)
    xt, yt = multilabel_bank(120, 4, rng, separable=True)
    scores, cv_ap, costs = svm_layer(x, y, xt, SVMConfig(costs=(0.1, 1.0, 10.0)), n_jobs=2)
    ap = voc07_classification_ap(scores, yt, np.zeros_like(yt))
    np.testing.assert_allclose(ap, 1.0)
    np.testing.assert_allclose(cv_ap.max(axis=1), 1.0)
    assert set(costs) <= {0.1, 1.0, 10.0}


def test_svm_on_label_free_features_scores_the_prior():
    rng = np.random.default_rng(2)
    x, y = multilabel_bank(300, 3, rng, separable=False)
    xt, yt = multilabel_bank(3000, 3, rng, separable=False)
    scores, _, _ = svm_layer(x, y, xt, SVMConfig(costs=(0.1, 1.0)), n_jobs=1)
    ap = voc07_classification_ap(scores, yt, np.zeros_like(yt), mode="area")
    np.testing.assert_allclose(ap, yt.mean(0), atol=0.04)


def test_svm_difficult_only_test_entries_are_left_out():
    """A difficult-only test image scored highest must not change the AP (VOC07 rules)."""
    rng = np.random.default_rng(3)
    x, y = multilabel_bank(200, 2, rng, separable=True)
    xt, yt = multilabel_bank(50, 2, rng, separable=True)
    scores, _, _ = svm_layer(x, y, xt, SVMConfig(costs=(1.0,)))
    yt2, diff = yt.copy(), np.zeros_like(yt)
    top = int(np.argmax(scores[:, 0]))
    yt2[top, 0], diff[top, 0] = 0, 1  # now a difficult-only entry: ignored, AP stays 1
    assert voc07_classification_ap(scores, yt2, diff)[0] == pytest.approx(1.0)
    assert voc07_classification_ap(scores, yt2, np.zeros_like(yt))[0] < 0.99  # counted: a miss


def single_label_bank(n: int, classes: int, rng, separable: bool):
    """One class per image: features along the class's own direction (+ noise), or pure noise."""
    labels = np.eye(classes)[rng.integers(0, classes, n)]
    noise = rng.normal(size=(n, 32))
    x = labels @ np.eye(classes, 32) * 5 + 0.1 * noise if separable else noise
    return x.astype(np.float32), labels


def test_lowshot_rows_draw_k_positives_and_c_minus_1_k_negatives():
    rng = np.random.default_rng(4)
    _, y = multilabel_bank(400, 4, rng, separable=False)
    difficult = np.zeros_like(y)
    difficult[:20, 0] = 1  # difficult-only entries of class 0: never drawn as its negatives
    y[:20, 0] = 0
    for k in (1, 3, 8):
        rows = lowshot_rows(y, difficult, k, sample=0)
        assert len(rows) == 4
        for c, r in enumerate(rows):
            assert len(np.unique(r)) == len(r) == 4 * k  # k + 3k, without replacement
            assert int(y[r, c].sum()) == k
            assert not difficult[r, c].any()
        # the draw is a function of (k, sample) only; another sample is another draw
        again = lowshot_rows(y, difficult, k, sample=0)
        assert all(np.array_equal(a, b) for a, b in zip(rows, again))
        other = lowshot_rows(y, difficult, k, sample=1)
        assert not all(np.array_equal(a, b) for a, b in zip(rows, other))
    assert lowshot_rows(y, difficult, int(y.sum(0).min()) + 1, 0) is None  # too few positives


def test_lowshot_svm_oracles():
    """Separable single-label bank: AP 1 from one shot on; label-free features: the prior."""
    rng = np.random.default_rng(5)
    cfg = Config(
        svm=SVMConfig(costs=(0.1, 1.0, 10.0)), lowshot=LowShotConfig(k=(1, 2, 8), samples=3)
    )
    x, y = single_label_bank(300, 4, rng, separable=True)
    xt, yt = single_label_bank(200, 4, rng, separable=True)
    zeros, zeros_t = np.zeros_like(y), np.zeros_like(yt)
    maps = lowshot_of((x, y, zeros), (xt, yt, zeros_t), cfg)
    assert set(maps) == {"1", "2", "8"}
    np.testing.assert_allclose([m for v in maps.values() for m in v], 1.0)

    x, y = single_label_bank(300, 4, rng, separable=False)
    xt, yt = single_label_bank(4000, 4, rng, separable=False)
    cfg.ap_mode = "area"
    maps = lowshot_of((x, y, zeros), (xt, yt, np.zeros_like(yt)), cfg)
    for values in maps.values():
        assert len(values) == 3
        np.testing.assert_allclose(np.mean(values), yt.mean(), atol=0.03)
    # a k no sample can reach: NaN, not an error
    cfg.lowshot = LowShotConfig(k=(1000,), samples=2)
    assert np.isnan(lowshot_of((x, y, zeros), (xt, yt, np.zeros_like(yt)), cfg)["1000"]).all()


def lowshot_of(train, test, cfg):
    return lowshot_layer(train, test, cfg.svm, cfg.lowshot, cfg.ap_mode, cfg.num_workers)


def test_knn_votes_oracle():
    """Database: unit vectors at 0°, 60°, 90°, 180°; query at 0°; k = 2, T = 0.5: neighbours
    0 (cos 1) and 1 (cos 0.5), weights softmax(1/0.5, 0.5/0.5) = (e2, e1) / (e2 + e1)."""
    angles = np.deg2rad([0, 60, 90, 180])
    db = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array(
        [[1], [3], [2], [5]]
    )  # norms vary
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]])
    votes = knn_scores(db, labels, np.array([[2.0, 0.0]]), k=2, temperature=0.5)
    e2, e1 = math.exp(2.0), math.exp(1.0)
    np.testing.assert_allclose(votes, [[1.0, e1 / (e2 + e1), 0.0]], rtol=1e-5)
    # leave-one-out: row 0's neighbours are now rows 1 (cos .5) and 2 (cos 0)
    loo = knn_scores(db, labels, db, k=2, temperature=0.5, exclude_self=True)
    w1, w0 = e1 / (e1 + 1.0), 1.0 / (e1 + 1.0)
    np.testing.assert_allclose(loo[0], [w1, w1, w0], rtol=1e-5)
    # row 3 (180°): rows 2 (cos 0) and 1 (cos -0.5)
    em = math.exp(-1)
    np.testing.assert_allclose(loo[3], [em / (1 + em), em / (1 + em), 1 / (1 + em)], rtol=1e-5)


def test_knn_scores_rank_by_votes_not_by_closeness():
    """VOC AP ranks scores across queries. Query A's 2 neighbours are very close, one has the
    class; query B's 2 are farther, both have it: B must score higher (softmax votes 1.0 vs 0.5;
    raw exp(sim / T) votes would rank A first, by e^(1/T) against 2 e^(0.707/T))."""
    db = np.array([[1.0, 0.0, 0.0], [1.0, 0.001, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([[1], [0], [1], [1]])
    queries = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    scores = knn_scores(db, labels, queries, k=2, temperature=0.07)[:, 0]
    np.testing.assert_allclose(scores, [0.5, 1.0], atol=1e-3)


def test_knn_clustered_bank_is_perfect_and_label_free_is_prior():
    rng = np.random.default_rng(4)
    x, y = multilabel_bank(300, 4, rng, separable=True)
    xt, yt = multilabel_bank(100, 4, rng, separable=True)
    ap = voc07_classification_ap(knn_scores(x, y, xt), yt, np.zeros_like(yt))
    assert mean_ap(ap) > 0.99
    x, y = multilabel_bank(600, 3, rng, separable=False)
    xt, yt = multilabel_bank(2000, 3, rng, separable=False)
    ap = voc07_classification_ap(knn_scores(x, y, xt), yt, np.zeros_like(yt), mode="area")
    np.testing.assert_allclose(ap, yt.mean(0), atol=0.05)


def test_stage_on_tiny_voc_caches_and_resumes(tiny_voc, tiny_ckpt, tmp_path, monkeypatch):
    argv = [f"checkpoint={tiny_ckpt}", f"data={tiny_voc}", f"run_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}", "svm.costs=[0.1,1.0]", "knn.k=5",
            "lowshot.k=[1,2,1000]", "lowshot.samples=3"]  # fmt: skip
    result = frozen.main(frozen.parse_config(argv))
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert torch.is_grad_enabled()  # no global side effect on the caller
    for layer in frozen.LAYERS:
        assert 0 <= result[f"svm_{layer}_mAP"] <= 1 and 0 <= result[f"knn_{layer}_mAP"] <= 1
        assert result[f"dim_{layer}"] == SMALL64_DIMS[layer]
    best = frozen.LAYERS[int(result["svm_best_layer"]) - 1]
    cv = {layer: result[f"svm_{layer}_cv_mAP"] for layer in frozen.LAYERS}
    assert best == max(cv, key=cv.get)  # chosen on cross-validation, not on test
    assert result["svm_best_mAP"] == result[f"svm_{best}_mAP"]
    knn_layer = frozen.LAYERS[int(result["knn_layer"]) - 1]
    assert result["knn_mAP"] == result[f"knn_{knn_layer}_mAP"]
    part = json.loads((tmp_path / "run" / "layers" / "lowshot.json").read_text())
    for k in (1, 2):  # on the SVM's layer; mean and sample std of the recorded samples
        maps = np.array(part["test_mAP"][str(k)])
        assert len(maps) == 3 and np.isfinite(maps).all()
        assert result[f"lowshot_k{k}_mAP"] == pytest.approx(maps.mean())
        assert result[f"lowshot_k{k}_std"] == pytest.approx(maps.std(ddof=1))
    assert "lowshot_k1000_mAP" not in result  # more shots than the tiny set has: not recorded

    # a second run folder reuses the cached features: no image is encoded again
    def no_encoding(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features, "layer_features", no_encoding)
    (tmp_path / "run" / "result.json").unlink()  # as if killed after the last layer
    argv[2] = f"run_dir={tmp_path / 'run'}"
    again = frozen.main(frozen.parse_config(argv))
    assert {k: v for k, v in again.items() if not k.endswith("_s")} == {
        k: v for k, v in result.items() if not k.endswith("_s")
    }


def test_cli_bad_input_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.frozen", f"checkpoint={tmp_path / 'missing.pt'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "missing.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
