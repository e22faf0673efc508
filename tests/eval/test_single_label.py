"""Single-label protocols (eval/single_label.py, eval/linear.py, eval/knn.py) against oracles: a
separable feature bank gives kNN and linear-probe top-1 = 100 %, shuffled labels give chance, top-k
by hand, the held-out split, and the whole stage on a tiny generated class-subfolder folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from core import features
from core.cli import UserError
from core.features import LAYERS
from eval import single_label
from eval.knn import knn_topk
from eval.linear import LinearConfig, LinearHeads, fixed_batches, head_scores, train_heads
from eval.metrics import topk_accuracy
from orchestrate.tables import SINGLE_LABEL_COLUMNS, build_table, collect_runs


def bank(n_per_class: int, classes: int, dim: int, rng, separable: bool):
    """Features [N, dim], int labels [N]: separable = tight clusters around orthogonal centres;
    otherwise features independent of the labels."""
    labels = np.repeat(np.arange(classes), n_per_class)
    noise = rng.normal(size=(len(labels), dim))
    if not separable:
        return noise.astype(np.float32), rng.permutation(labels)
    centres = np.eye(dim)[:classes] * 10
    return (centres[labels] + noise).astype(np.float32), labels


def probe_top1(xtr, ytr, xte, yte, classes, epochs=30, lrs=(0.1,)):
    torch.manual_seed(0)
    cfg = LinearConfig(epochs=epochs, batch_size=32, lrs=lrs, augment=False)
    heads = LinearHeads({"f": xtr.shape[1]}, classes, cfg.lrs)
    train_heads(heads, fixed_batches({"f": xtr}, ytr, cfg.batch_size, 0), len(ytr) // 32 + 1, cfg)
    scores = head_scores(heads, {"f": xte})
    return [topk_accuracy(scores["f", i], yte)[1] for i in range(len(lrs))]


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 0.0]])
    acc = topk_accuracy(scores, np.array([1, 2, 2]), (1, 2, 3))
    assert acc == {1: 1 / 3, 2: 2 / 3, 3: 1.0}  # constant scores: a tie is not a lucky hit


def test_separable_bank_gives_100_percent():
    rng = np.random.default_rng(0)
    x, y = bank(40, 5, 16, rng, separable=True)
    xt, yt = bank(30, 5, 16, rng, separable=True)
    assert knn_topk(x, y, xt, yt, 5) == {1: 1.0, 5: 1.0}
    assert probe_top1(x, y, xt, yt, 5) == [1.0]


def test_shuffled_labels_give_chance():
    rng = np.random.default_rng(1)
    x, y = bank(100, 4, 16, rng, separable=False)
    xt, yt = bank(500, 4, 16, rng, separable=False)
    acc = knn_topk(x, y, xt, yt, 4, ks=(1, 2))
    assert acc[1] == pytest.approx(0.25, abs=0.04) and acc[2] == pytest.approx(0.5, abs=0.05)
    assert probe_top1(x, y, xt, yt, 4, epochs=5) == [pytest.approx(0.25, abs=0.04)]


def test_parallel_heads_train_independently():
    """A head's result does not depend on the other lrs trained beside it."""
    rng = np.random.default_rng(2)
    x, y = bank(30, 3, 8, rng, separable=False)
    xt, yt = bank(30, 3, 8, rng, separable=False)
    alone = probe_top1(x, y, xt, yt, 3, epochs=3, lrs=(0.01,))
    together = probe_top1(x, y, xt, yt, 3, epochs=3, lrs=(0.01, 1.0))
    assert together[0] == alone[0]


def test_holdout_rows_are_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(3), [10, 20, 1])
    fit, held = single_label.holdout_rows(labels, 0.1)
    assert np.intersect1d(fit, held).size == 0 and len(fit) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 2, 0]
    again = single_label.holdout_rows(labels, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip((fit, held), again))


def class_folder(root, classes=3, train=10, val=5, size=72):
    """``root/{train,val}/<class>/*.png``: each class a distinct colour plus noise."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])[:classes]
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-25, 26, (size, size, 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_stage_end_to_end_on_a_class_folder(make_checkpoint, tmp_path, monkeypatch):
    data = class_folder(tmp_path / "data")
    ckpt = make_checkpoint(tmp_path / "ck.pt", seed=0)
    argv = [f"checkpoint={ckpt}", f"data={data}", f"run_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}", "knn.k=5", "linear.epochs=2",
            "linear.batch_size=8", "linear.lrs=[0.01,0.1]", "holdout=0.2", "device=cpu"]  # fmt: skip
    result = single_label.main(single_label.parse_config(argv))
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert (result["n_train"], result["n_val"], result["num_classes"]) == (30, 15, 3)
    for proto in ("knn", "linear"):
        for layer in LAYERS:
            assert 0 <= result[f"{proto}_{layer}_top1"] <= result[f"{proto}_{layer}_top5"] == 1.0
        best = LAYERS[int(result[f"{proto}_layer"]) - 1]
        held = {layer: result[f"{proto}_{layer}_holdout_top1"] for layer in LAYERS}
        assert held[best] == max(held.values())  # chosen on the held-out part of train
        assert result[f"{proto}_top1"] == result[f"{proto}_{best}_top1"]
    assert result["knn_top1"] == 1.0  # colours: even random conv features separate them
    assert result["linear_conv1_lr"] in (0.01, 0.1)

    # a second run folder reuses the cached features (the probe's crops still pass the encoder)
    def no_encoding(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features, "layer_features", no_encoding)
    argv2 = [a.replace(str(tmp_path / "run"), str(tmp_path / "run2")) for a in argv]
    again = single_label.main(single_label.parse_config([*argv2, "protocols=[knn]"]))
    assert {k: v for k, v in again.items() if k.startswith("knn_") and not k.endswith("_s")} == {
        k: v for k, v in result.items() if k.startswith("knn_") and not k.endswith("_s")
    }

    # the table machinery reads the runs: mean over seeds of the chosen layer's top-1
    run_json = {"stage": "eval", "task": "single_label", "variant": "ce", "seed": 0}
    (tmp_path / "run" / "run.json").write_text(json.dumps(run_json))
    table, _ = build_table(collect_runs(tmp_path / "run"), SINGLE_LABEL_COLUMNS, [("CE", "ce")])
    assert table.loc[0, "kNN top-1 (%)"] == "100.0 (n=1)"


def test_flat_folder_is_one_error_line(make_checkpoint, tmp_path):
    data = tmp_path / "flat"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    for split in ("train", "val"):
        Image.new("RGB", (64, 64)).save(data / split / "a.png")
    ckpt = make_checkpoint(tmp_path / "ck.pt", seed=0)
    proc = subprocess.run(
        [sys.executable, "-m", "eval.single_label", f"checkpoint={ckpt}", f"data={data}",
         f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "class subfolders" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_label_subsets_are_fixed_stratified_and_nested_in_size():
    from eval.finetune import label_subset

    labels = np.repeat(np.arange(4), [200, 100, 50, 3])
    one, ten = label_subset(labels, 0.01), label_subset(labels, 0.1)
    assert np.bincount(labels[one], minlength=4).tolist() == [2, 1, 1, 1]  # at least one per class
    assert np.bincount(labels[ten], minlength=4).tolist() == [20, 10, 5, 1]
    assert np.array_equal(one, label_subset(labels, 0.01))  # the same draw every time
    assert len(np.unique(ten)) == len(ten)


def test_finetune_protocol_records_its_subset(make_checkpoint, tmp_path):
    data = class_folder(tmp_path / "data", train=10, val=4)
    ckpt = make_checkpoint(tmp_path / "ck.pt", seed=0)
    argv = [f"checkpoint={ckpt}", f"data={data}", f"run_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}", "protocols=[finetune]", "finetune.fractions=[0.2,1.0]",
            "finetune.epochs=8", "finetune.batch_size=8", "finetune.lr=0.005", "device=cpu"]  # fmt: skip
    result = single_label.main(single_label.parse_config(argv))
    assert result["finetune20_n"] == 6 and result["finetune100_n"] == 30  # 2 / 10 per class
    subset = json.loads((tmp_path / "run" / "parts" / "finetune20.json").read_text())["subset"]
    assert len(subset) == 6 and sorted({s.split("/")[0] for s in subset}) == [
        "class0",
        "class1",
        "class2",
    ]
    for name in ("finetune20", "finetune100"):
        assert 0 <= result[f"{name}_top1"] <= result[f"{name}_top5"] == 1.0
    assert result["finetune100_top1"] > 0.9  # colour classes: learnt from all labels


def test_odd_image_modes_are_converted_and_counted_or_refused_when_strict(
    make_checkpoint, tmp_path
):
    """The stage reads its folders through the one intake rule (core.images): a greyscale train
    image and an RGBA val image are converted and counted in result.json; strict refuses them."""
    data = class_folder(tmp_path / "data")
    Image.open(data / "train" / "class0" / "0.png").convert("L").save(
        data / "train" / "class0" / "0.png"
    )
    Image.open(data / "val" / "class1" / "0.png").convert("RGBA").save(
        data / "val" / "class1" / "0.png"
    )
    ckpt = make_checkpoint(tmp_path / "ck.pt", seed=0)
    argv = [f"checkpoint={ckpt}", f"data={data}", f"cache_dir={tmp_path / 'cache'}", "knn.k=5",
            "protocols=[knn]", "device=cpu"]  # fmt: skip
    result = single_label.main(single_label.parse_config([*argv, f"run_dir={tmp_path / 'a'}"]))
    assert result["images/train/converted/L"] == 1 and result["images/val/converted/RGBA"] == 1
    assert result["images/train/used"] == result["n_train"] == 30
    strict = single_label.parse_config([*argv, f"run_dir={tmp_path / 'b'}", "images.strict=true"])
    with pytest.raises(UserError, match="0.png"):
        single_label.main(strict)
    assert not (tmp_path / "b" / "result.json").exists()
