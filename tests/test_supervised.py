"""method=supervised: the labelled upper bound trains, resumes exactly and loads like any checkpoint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import data as pretext_data
from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint, model_from_checkpoint
from core.datasets import ImageFolderClasses, LabelError
from core.pretrained import Pretrained
from pretext.methods.supervised import classification_loss
from pretext.train import main, parse_config

ROOT = Path(__file__).parents[1]
SUP = ["method=supervised", "head.hidden=64", "head.dropout=0.0"]


def run(args):
    return main(parse_config(args))


def _class_folder(voc: Path, out: Path, names=("zebra", "ant", "moth")) -> Path:
    """``out/{train,val}/<name>/*.jpg`` from the mini-VOC's photos, classes assigned round-robin."""
    photos = sorted((voc / "JPEGImages").glob("*.jpg"))
    for i, photo in enumerate(photos):
        split = "val" if i % 4 == 0 else "train"
        target = out / split / names[i % len(names)] / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    return out


def test_supervised_learns_and_loads_through_the_transfer_path(tiny_train_args, tmp_path):
    from transfer import classify

    result = run([*tiny_train_args, *SUP, "optim.steps=30", "optim.lr=0.002"])
    run_dir = tmp_path / "run"
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert len(losses) == 15
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    assert json.loads((run_dir / "result.json").read_text()) == pytest.approx(result)
    assert {"val_mAP", "train_mAP", "train_time_s", "final_loss"} <= set(result)
    assert all(v == v for v in result.values()), result  # no NaN
    assert not (run_dir / "inpainting.json").exists()  # the decoder is untrained: no inpainting

    state = load_checkpoint(run_dir)
    assert state["method"] == "supervised" and state["step"] == 30
    assert len(state["class_names"]) == 8 and "head" in state
    pre = Pretrained.load(run_dir)
    encoder = pre.encoder()
    assert pre.method == "supervised" and encoder(torch.zeros(1, 3, 64, 64)).shape == (
        1,
        96,
        4,
        4,
    )
    cfg = classify.Config(checkpoint=str(run_dir), arch="small64")
    pre, model = classify.read_checkpoint(cfg)  # transfer.classify's loader
    assert pre.method == "supervised"
    untrained = model_from_checkpoint({**state, "model": _fresh(state)}).encoder.state_dict()
    trained = model.encoder.state_dict()
    assert trained.keys() == untrained.keys()
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)


def _fresh(state):
    from core.models import build_model

    torch.manual_seed(0)  # the run's seed: the network before training
    return build_model(state["arch"], state["dropout"], state["output"]).state_dict()


def test_supervised_resume_gives_the_same_weights(tiny_train_args, tmp_path):
    straight = [
        a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in tiny_train_args
    ]
    run([*straight, *SUP])
    with pytest.raises(FloatingPointError, match="at step 6"):
        run([*tiny_train_args, *SUP, "fail_at_step=6"])
    assert load_checkpoint(tmp_path / "run")["step"] == 4
    run([*tiny_train_args, *SUP])
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    for key in ("model", "head"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == sorted(set(steps))


def test_folder_labels_are_the_sorted_subfolders(tiny_voc, tiny_train_args, tmp_path):
    root = _class_folder(tiny_voc, tmp_path / "imagenet")
    ds = ImageFolderClasses(root / "train", 64, train=False)
    assert ds.class_names == ("ant", "moth", "zebra")
    for path, label in zip(ds.files, ds.labels.tolist()):
        assert Path(path).parent.name == ds.class_names[label]
    assert ds[0][1].dtype == torch.int64
    args = [a for a in tiny_train_args if not a.startswith("data.root=")]
    result = run([*args, *SUP, "data.format=folder", f"data.root={root}", "optim.steps=4"])
    assert 0.0 <= result["val_top1"] <= 1.0 and "train_top1" in result
    assert load_checkpoint(tmp_path / "run")["class_names"] == ["ant", "moth", "zebra"]


def test_flat_folder_and_unknown_val_class_are_errors(tiny_voc, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for photo in sorted((tiny_voc / "JPEGImages").glob("*.jpg"))[:4]:
        shutil.copy(photo, flat / photo.name)
    with pytest.raises(LabelError, match="no class subfolders"):
        ImageFolderClasses(flat, 64, train=False)
    (flat / "cls").mkdir()
    shutil.copy(next(flat.glob("*.jpg")), flat / "cls" / "x.jpg")
    with pytest.raises(LabelError, match="is not in a class subfolder"):
        ImageFolderClasses(flat, 64, train=False)
    root = _class_folder(tiny_voc, tmp_path / "imagenet")
    with pytest.raises(LabelError, match=r"\['zebra'\] are not among"):
        ImageFolderClasses(root / "val", 64, train=False, class_names=("ant", "moth"))


def test_flat_folder_cli_error_is_one_line(tiny_voc, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for photo in sorted((tiny_voc / "JPEGImages").glob("*.jpg"))[:8]:
        shutil.copy(photo, flat / photo.name)
    proc = subprocess.run(
        [sys.executable, "-m", "pretext.train", "method=supervised", "data.format=folder",
         f"data.root={flat}", f"run_dir={tmp_path / 'run'}", "optim.batch_size=4"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {flat}: no class subfolders")
    assert "Traceback" not in proc.stderr


def test_losses_ignore_difficult_entries_and_match_torch():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # labels + difficult-only entries
    difficult = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    kept = torch.tensor([[2.0, 0.5], [0.0, 3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(*kept)
    assert torch.allclose(classification_loss(logits, target, difficult), expected)
    labels = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(classification_loss(logits, labels), expected)


def test_supervised_builtin_set_is_a_second_minivoc_seed(tmp_path, monkeypatch):
    from core import minivoc

    calls = []
    monkeypatch.setattr(minivoc, "generate", lambda out, **kw: calls.append((Path(out), kw)))
    for name in ("minivoc", "minivoc_pretrain"):
        root = tmp_path / "data" / name / "VOC2007"
        assert pretext_data.is_builtin_root(root)
        pretext_data.ensure_builtin(root)
    assert calls == [(tmp_path / "data" / "minivoc", {"n_images": 1000, "seed": 0}),
                     (tmp_path / "data" / "minivoc_pretrain", {"n_images": 3000, "seed": 1})]  # fmt: skip
    assert not pretext_data.is_builtin_root(tmp_path / "data" / "other" / "VOC2007")


def test_profiles_run_supervised_on_its_own_data(monkeypatch):
    from orchestrate.jobs import expand
    from orchestrate.profile import load_profile, profile_path

    monkeypatch.chdir(ROOT)
    for name, data in (
        ("builtin", "data/minivoc_pretrain/VOC2007"),
        ("paper", "/datasets/imagenet"),
    ):
        jobs = expand(load_profile(profile_path(name)))
        pre = [j for j in jobs if j.stage == "pretext" and j.variant == "supervised"]
        assert [j.seed for j in pre] == [0, 1, 2]
        for job in pre:
            cfg = parse_config(list(job.argv))  # the config files and overrides resolve
            assert cfg.method == "supervised" and cfg.data.root == data
        tasks = {j.task for j in jobs if j.stage == "transfer" and j.variant == "supervised"}
        assert tasks == {"classify", "detect", "segment"}
    builtin = expand(load_profile(profile_path("builtin")))
    ce = next(j for j in builtin if j.stage == "pretext" and j.variant == "context_encoder")
    # every pretext method learns from the same pretraining set, disjoint from the transfer set
    assert parse_config(list(ce.argv)).data.root == "data/minivoc_pretrain/VOC2007"


def test_run_folder_from_before_the_head_section_resumes(tiny_train_args, tmp_path):
    with pytest.raises(FloatingPointError):
        run([*tiny_train_args, "optim.steps=6", "fail_at_step=5"])
    saved = tmp_path / "run" / "config.yaml"
    text = saved.read_text()
    start = text.index("head:")
    end = text.index("checkpoint_every:")
    saved.write_text(text[:start] + text[end:])  # as written before HeadConfig existed
    assert run([*tiny_train_args, "optim.steps=6"])["steps"] == 6
