"""Table 1 bench: NN-inpainting oracle, agreement with pretext.inpainting, Telea, the stage's keys."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import inpainting_bench as bench
from eval.features import load_model, voc_images
from pretext.inpainting import evaluate_inpainting, hole_errors
from pretext.masks import central_mask

HOLE = central_mask(64, 2)
MEAN = [0.1, -0.05, 0.0]  # any fill colour will do


def tiny_images(voc, split: str, n: int | None = None) -> torch.Tensor:
    return bench.stack(voc_images(voc, split, 64), n)


def test_nn_hog_with_the_query_in_the_database_pastes_its_own_hole(tiny_voc):
    queries = tiny_images(tiny_voc, "val", 6)
    database = torch.cat([tiny_images(tiny_voc, "train"), queries.flip(0)])
    qf = bench.hog_features(bench.mean_fill(queries, HOLE, MEAN))
    dbf = bench.hog_features(bench.mean_fill(database, HOLE, MEAN))
    filled, nearest = bench.nn_inpaint(queries, qf, database, dbf, HOLE)
    assert nearest.tolist() == [len(database) - 1 - i for i in range(6)]
    errors = hole_errors(filled, queries.float() / 255, torch.from_numpy(HOLE))
    assert float(errors["l2"].max()) == 0.0
    assert float(errors["psnr"].min()) >= 99  # 10 log10(1 / 1e-10): the clamp of a perfect fill


def test_mean_fill_matches_pretext_inpainting(tiny_voc, tiny_ckpt, ckpt_mean):
    model, _ = load_model(tiny_ckpt)
    dataset = voc_images(tiny_voc, "test", 64)
    ref = evaluate_inpainting(model, dataset, ckpt_mean, overlap=2, max_images=10)
    images = tiny_images(tiny_voc, "test", 10)
    ours = hole_errors(
        bench.mean_fill(images, HOLE, ckpt_mean), images.float() / 255, torch.from_numpy(HOLE)
    )
    for key in ("l1", "l2", "psnr"):
        assert float(ours[key].mean()) == pytest.approx(ref[f"mean_fill_{key}"], rel=1e-5)
    # and the context encoder's numbers too (same paste-into-hole convention)
    ce = bench.ce_inpaint(model, images, HOLE, ckpt_mean)
    ce_err = hole_errors(ce, images.float() / 255, torch.from_numpy(HOLE))
    assert float(ce_err["l2"].mean()) == pytest.approx(ref["l2"], rel=1e-4)


def test_telea_beats_mean_fill_on_a_smooth_image_and_keeps_the_context():
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([2 * xx + 30, 3 * yy + 20, xx + yy + 40]).astype(np.uint8)  # linear ramps
    images = torch.from_numpy(smooth)[None]
    truth = images.float() / 255
    hole = torch.from_numpy(HOLE)
    telea = bench.telea_inpaint(images, HOLE)
    fill = bench.mean_fill(images, HOLE, MEAN)
    assert float(hole_errors(telea, truth, hole)["l2"]) < 0.1 * float(
        hole_errors(fill, truth, hole)["l2"]
    )
    assert torch.equal(telea[:, :, ~hole], truth[:, :, ~hole])


def test_bench_stage_keys_values_and_grid(tiny_voc, tiny_ckpt, tmp_path):
    argv = [
        f"data={tiny_voc}", f"run_dir={tmp_path / 'run'}", f"ce_l2={tiny_ckpt}",
        f"ce_l2_adv={tiny_ckpt}", f"cache_dir={tmp_path / 'cache'}", "grid_rows=3",
    ]  # fmt: skip
    cfg = bench.parse_config(argv)
    assert cfg.methods == bench.METHODS and cfg.nn_features == str(tiny_ckpt)
    result = bench.main(cfg)
    metrics = {f"{m}/{k}" for m in bench.METHODS for k in ("l1", "l2", "psnr", "time_s")}
    assert set(result) == metrics | {"n_images", "overlap", "image_size", "time_s"}
    assert all(np.isfinite(v) for v in result.values())
    assert result["overlap"] == 2 and result["image_size"] == 64 and result["n_images"] == 12
    for m in bench.METHODS:
        assert 0 < result[f"{m}/l2"] < result[f"{m}/l1"] < 1  # errors in [0, 1]: L2 < L1
    assert result["ce_l2/l2"] == result["ce_l2_adv/l2"]  # the same checkpoint twice
    run = tmp_path / "run"
    assert json.loads((run / "result.json").read_text()) == result
    grid = json.loads((run / "inpainting_grid.json").read_text())
    assert grid["columns"] == ["masked_input", *bench.METHODS, "truth"]
    assert Image.open(run / "inpainting_grid.png").size == (8 * 68, 3 * 68)


def test_a_method_without_its_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="ce_l2_adv needs a checkpoint: set ce_l2_adv="):
        bench.parse_config(["methods=[mean_fill,ce_l2_adv]"])
    assert bench.parse_config([]).methods == ("mean_fill", "nn_hog", "telea")
