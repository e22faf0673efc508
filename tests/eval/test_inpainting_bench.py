"""Table 1 bench: NN-inpainting oracle, agreement with core.inpainting, Telea, the stage's keys."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from core import voc
from core.inpainting import evaluate_inpainting, hole_errors
from core.masks import central_mask
from core.pretrained import Pretrained
from core.splits import open_split
from eval import inpainting_bench as bench

HOLE = central_mask(64, 2)
MEAN = [0.1, -0.05, 0.0]  # any fill colour will do


def tiny_images(voc, split: str, n: int | None = None) -> torch.Tensor:
    return bench.stack(open_split(voc, split, 64, False), n)


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
    model = Pretrained.load(tiny_ckpt).network().eval()
    dataset = open_split(tiny_voc, "test", 64, False)
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
    keys = ["l1", "l2", "psnr", "time_s"]
    keys += [f"{k}_{r}" for k in ("l1", "l2", "psnr", "psnr_pooled") for r in ("hole", "center")]
    metrics = {f"{m}/{k}" for m in bench.METHODS for k in keys}
    intake = {k for k in result if k.startswith("images/")}  # what core.images did to the data
    assert set(result) - intake == metrics | {"n_images", "overlap", "image_size", "time_s"}
    assert result["images/split/converted"] == 0 and result["images/split/skipped_bad"] == 0
    assert result["images/split/used"] == result["images/split/files"] >= 12
    assert all(np.isfinite(v) for v in result.values())
    assert result["overlap"] == 2 and result["image_size"] == 64 and result["n_images"] == 12
    for m in bench.METHODS:
        assert 0 < result[f"{m}/l2"] < result[f"{m}/l1"] < 1  # errors in [0, 1]: L2 < L1
        assert result[f"{m}/psnr"] == result[f"{m}/psnr_hole"]  # the main column: the hole
        # the band around the hole is known context (zero error): the centre dilutes the hole
        ratio = HOLE.sum() / 32**2
        assert result[f"{m}/l2_center"] == pytest.approx(result[f"{m}/l2_hole"] * ratio, rel=1e-5)
        assert result[f"{m}/psnr_pooled_hole"] <= result[f"{m}/psnr_hole"] + 1e-9  # Jensen
    assert result["ce_l2/l2"] == result["ce_l2_adv/l2"]  # the same checkpoint twice
    run = tmp_path / "run"
    assert json.loads((run / "result.json").read_text()) == result
    grid = json.loads((run / "inpainting_grid.json").read_text())
    assert grid["columns"] == ["masked_input", *bench.METHODS, "truth"]
    png = np.asarray(Image.open(run / "inpainting_grid.png").convert("L"))
    header = png.shape[0] - 3 * 68  # the column labels, drawn above the rows
    assert png.shape[1] == 8 * 68 and 10 <= header <= 40
    for k in range(8):  # every column has its label: dark text pixels over its cells
        assert (png[:header, k * 68 : (k + 1) * 68] < 128).sum() > 10, k


def test_a_method_without_its_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="ce_l2_adv needs a checkpoint: set ce_l2_adv="):
        bench.parse_config(["methods=[mean_fill,ce_l2_adv]"])
    assert bench.parse_config([]).methods == ("mean_fill", "nn_hog", "telea")


def test_region_scores_oracle_constant_prediction_against_known_images():
    """Grey 0.5 predicted for two images: one black, one whose hole is white and band black."""
    from core.inpainting import region_scores

    size, overlap = 16, 2  # central square 4..12 (64 px), hole 6..10 (16 px)
    hole = torch.from_numpy(central_mask(size, overlap))
    center = torch.zeros(size, size, dtype=torch.bool)
    center[4:12, 4:12] = True
    truth = torch.zeros(2, 3, size, size)
    truth[1][:, hole] = 1.0
    filled = truth.clone()
    filled[:, :, hole] = 0.5  # the known context (band included) kept, the hole grey
    h = region_scores(filled, truth, hole)
    assert h["l1"] == pytest.approx(0.5) and h["l2"] == pytest.approx(0.25)
    assert h["psnr"] == pytest.approx(10 * np.log10(4)) == pytest.approx(h["psnr_pooled"])
    c = region_scores(filled, truth, center)  # 16 of 64 pixels wrong by 0.5
    assert c["l1"] == pytest.approx(0.5 * 16 / 64) and c["l2"] == pytest.approx(0.25 * 16 / 64)
    assert c["psnr"] == pytest.approx(10 * np.log10(16))
    # per-image vs pooled PSNR differ when images differ: image 0 perfect-ish, image 1 off by 0.5
    filled2 = truth.clone()
    filled2[1][:, hole] = 0.0  # image 1's hole: error 1; image 0's: 0
    filled2[0][:, hole] = 0.1
    s2 = region_scores(filled2, truth, hole)
    assert s2["l2"] == pytest.approx((0.01 + 1.0) / 2)
    assert s2["psnr"] == pytest.approx((10 * np.log10(1 / 0.01) + 0.0) / 2)  # (20 + 0) / 2
    assert s2["psnr_pooled"] == pytest.approx(10 * np.log10(2 / 1.01))


def _copy_split(voc, split: str, out, nested: bool = False):
    from core import voc as voclib

    for k, image_id in enumerate(voclib.read_split(voc, split)):
        target = out / (f"class{k % 2}/" if nested else "") / f"{image_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((voc / "JPEGImages" / f"{image_id}.jpg").read_bytes())
    return out


@pytest.mark.parametrize("layout", ["folders", "class_subfolders", "split_files"])
def test_bench_on_an_image_folder_equals_the_same_images_in_voc_layout(
    tiny_voc, tiny_ckpt, tmp_path, layout
):
    common = [f"ce_l2={tiny_ckpt}", f"cache_dir={tmp_path / 'cache'}", "grid_rows=2"]
    ref = bench.main(bench.parse_config([*common, f"data={tiny_voc}", f"run_dir={tmp_path / 'v'}"]))
    root = tmp_path / "photos"
    if layout == "split_files":  # one folder, train/test named by files of relative paths
        _copy_split(tiny_voc, "train", root / "all")
        _copy_split(tiny_voc, "test", root / "all")
        for split in ("train", "test"):
            names = [f"all/{i}.jpg" for i in voc.read_split(tiny_voc, split)]
            (root / f"{split}.txt").write_text("\n".join(names) + "\n")
        splits = ["split=test.txt", "train_split=train.txt"]
    else:  # two folders, train/ and held_out/
        nested = layout == "class_subfolders"
        _copy_split(tiny_voc, "train", root / "train", nested)
        _copy_split(tiny_voc, "test", root / "held_out", nested)
        splits = ["split=held_out"]  # means over images: the order of the files does not matter
    out = bench.main(
        bench.parse_config([*common, f"data={root}", f"run_dir={tmp_path / 'f'}", *splits])
    )
    assert out["n_images"] == ref["n_images"] == 12
    for key, value in ref.items():
        if not key.endswith("time_s"):
            assert out[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_open_split_forms_and_a_clear_error(tiny_voc, tmp_path):
    def views(root, split, size):
        return open_split(root, split, size, False)

    root = _copy_split(tiny_voc, "val", tmp_path / "imgs" / "val", nested=True).parent
    nested = views(root, "val", 64)
    assert all(i.startswith(("class0/", "class1/")) for i in nested.ids)
    assert len(views(root, "", 64)) == len(nested)
    assert len(views(root, str(root / "val"), 64)) == len(nested)
    # a split file of VOC ids inside a VOC root
    (tmp_path / "ids.txt").write_text("000001\n000002\n")
    listed = views(tiny_voc, str(tmp_path / "ids.txt"), 64)
    assert listed.ids == ["000001", "000002"] and listed.files[0].endswith("JPEGImages/000001.jpg")
    with pytest.raises(FileNotFoundError, match=r"split 'nope' of .* not found: expected a folder"):
        views(root, "nope", 64)
