"""The `paper` profile cannot run here (ImageNet, Paris StreetView, VOC, GPUs), but every one of its
configs must load, validate and start: each job of the profile runs for one iteration, on the tiny
built-in mini-VOC standing in for ImageNet / Paris StreetView / VOC2007 / VOC2012, with only sizes,
step counts and dataset paths overridden."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrate.jobs import expand
from orchestrate.profile import load_profile, profile_path

pytestmark = pytest.mark.slow

# One iteration (or the smallest unit of work) and tiny batches; everything else is the paper's.
ONE_ITERATION = {
    "pretext.train": ["optim.steps=1", "optim.batch_size=2", "data.num_workers=0",
                      "eval_images=2", "checkpoint_every=1", "threads=2"],
    "transfer.classify": ["finetune.epochs=1", "finetune.batch_size=8", "finetune.rescale_batch=8",
                          "linear.max_iter=2", "num_workers=0", "threads=2"],
    "transfer.detect": ["max_iters=1", "batch_size=1", "warmup_iters=0", "num_workers=0",
                        "image_scale=[400,240]", "threads=2"],
    "transfer.segment": ["max_iters=1", "batch_size=1", "warmup_iters=0", "num_workers=0",
                         "image_scale=[320,160]", "crop_size=128", "threads=2"],
    "eval.inpainting_bench": ["max_images=4"],
    "eval.retrieval": ["approx=[hnsw]"],
    "eval.frozen": ["svm.costs=[0.1,1.0]"],
    "eval.single_label": ["linear.epochs=1", "linear.batch_size=8", "linear.lrs=[0.01]",
                          "num_workers=0", "knn.k=2"],
}  # fmt: skip


def _image_folder(voc: Path, out: Path) -> Path:
    """An ImageNet-style folder (train/<wnid>/*.JPEG, val/...) of the mini-VOC's photos."""
    photos = sorted((voc / "JPEGImages").glob("*.jpg"))
    for i, photo in enumerate(photos):
        split = "val" if i % 4 == 0 else "train"
        target = out / split / f"n0000000{i % 2}" / f"{photo.stem}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    return out


def _paris_folder(voc: Path, out: Path) -> Path:
    """Paris StreetView's layout: flat paris_train_original/ and paris_eval_gt/ folders of PNGs."""
    from PIL import Image

    photos = sorted((voc / "JPEGImages").glob("*.jpg"))
    for i, photo in enumerate(photos):
        split = "paris_eval_gt" if i % 4 == 0 else "paris_train_original"
        (out / split).mkdir(parents=True, exist_ok=True)
        Image.open(photo).save(out / split / f"{photo.stem}.png")
    return out


def _run(module: str, argv: list[str]) -> dict:
    import importlib

    mod = importlib.import_module(module)
    return mod.main(mod.parse_config(argv))


def test_paper_profile_configs_load_validate_and_start(tmp_path, monkeypatch):
    from core import minivoc

    monkeypatch.chdir(Path(__file__).parents[2])  # config paths in the profile are repo-relative
    # AlexNet-227 refuses images whose short side is under 113 px: a mini-VOC of larger photos
    tiny_voc = minivoc.generate(tmp_path / "voc", n_images=24, size_range=(240, 320), workers=1)
    profile = load_profile(
        profile_path("paper"),
        {"runs_root": str(tmp_path / "runs"), "data": str(tiny_voc), "seeds": [0]},
    )
    paris = _paris_folder(tiny_voc, tmp_path / "paris")
    variants = {  # the Table-1 networks read Paris StreetView, the others ImageNet
        name: replace(spec, data=str(paris)) if spec.data else spec
        for name, spec in profile.pretext.variants.items()
    }
    imagenet = _image_folder(tiny_voc, tmp_path / "imagenet")
    profile.pretext = replace(
        profile.pretext, data=str(imagenet),
        variants=variants,
        overrides=[f"mask.shapes_root={tiny_voc}"],  # stands in for VOC2012's silhouettes
    )  # fmt: skip
    profile.transfer = {
        t: replace(spec, data=str(tiny_voc)) for t, spec in profile.transfer.items()
    }
    profile.eval["inpainting"] = replace(profile.eval["inpainting"], data=str(paris))
    profile.eval["single_label"] = replace(profile.eval["single_label"], data=str(imagenet))
    jobs = expand(profile)
    assert {(j.stage, j.task) for j in jobs} == {
        ("pretext", "pretext"), ("transfer", "classify"), ("transfer", "detect"),
        ("transfer", "segment"), ("eval", "inpainting"), ("eval", "retrieval"), ("eval", "frozen"),
        ("eval", "single_label"),
    }  # fmt: skip
    # one job of each (stage, task), plus the pretext runs the chosen ones read
    chosen = [j for j in jobs if j.variant in ("context_encoder", "all")]
    needed = {d for j in chosen for d in j.deps}
    chosen = [j for j in jobs if j.stage == "pretext" and j.run_dir in needed] + [
        j for j in chosen if j.stage != "pretext"
    ]
    for job in chosen:
        argv = [*job.argv, *ONE_ITERATION[job.module]]
        if job.stage == "eval":
            argv.append(f"cache_dir={tmp_path / 'cache'}")
        result = _run(job.module, argv)
        # per-class APs / IoUs of classes absent from the 6 test images are NaN (undefined), not mAP
        headline = {
            k: v for k, v in result.items() if "_AP_" not in k and not k.startswith(("AP_", "IoU_"))
        }
        assert headline and all(v == v for v in headline.values()), (job.name, result)
        recorded = json.loads((Path(job.run_dir) / "result.json").read_text())
        assert recorded.keys() == result.keys(), job.name
        assert {k: recorded[k] for k in headline} == headline, job.name
        meta = Path(job.run_dir) / "config.yaml"
        assert meta.exists(), job.name
        if job.stage == "pretext" and job.variant.startswith("inpaint128"):
            assert "arch: inpaint128" in meta.read_text() and "/paris" in meta.read_text()
        elif job.stage == "pretext":
            assert "arch: alexnet227" in meta.read_text()
            if job.variant == "context_encoder":
                assert result["mask_shapes_source"].startswith(f"voc:{tiny_voc} (")
        if job.task == "inpainting":  # Table 1 on the held-out Paris folder, both regions
            assert result["image_size"] == 128 and result["n_images"] == 4
            assert {"ce_l2/psnr_hole", "ce_l2_adv/psnr_center", "nn_ce/l2_center"} <= set(result)
        if job.task == "single_label":  # Zhang et al.'s conv1..conv5 linear table, on val
            assert {f"linear_conv{i}_top1" for i in range(1, 6)} <= set(result)
            assert result["num_classes"] == 2 and result["n_val"] > 0
        if job.module in ("transfer.detect", "transfer.segment"):
            assert "optimizer: sgd" in meta.read_text() and "max_iters: 1" in meta.read_text()
