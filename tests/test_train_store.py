"""``data.store=PATH`` through ``pretext.train``: the trainer's batches cut from an image store
(core.batched_source) instead of decoded per image. It trains (the loss goes down), the holes
it trains on have the per-image path's coverage distribution, a resumed run ends with the
uninterrupted run's weights, a store of other data is refused before anything is written, and a
method whose batch transform needs single images is refused."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from core.atomic_io import read_jsonl
from core.batched_source import make_batched_source
from core.checkpoint import load_checkpoint
from core.config import ConfigError
from core.image_store import ImageStore, StoreError, StoreSettings, build
from pretext import distributed, engine
from pretext.train import cli, input_checks, main, parse_config

ONE_STEP = engine.one_step
P_MIN = 0.01  # fixed seeds: a p-value is a fixed number; this one is a real departure


@pytest.fixture(scope="module")
def store64(tiny_voc, tmp_path_factory):
    return build(
        tiny_voc, tmp_path_factory.mktemp("store") / "s64", StoreSettings("voc", "train", 64)
    )


def run(args):
    return main(parse_config(args))


def test_the_store_trains_and_records_its_fingerprint(tiny_train_args, store64, tmp_path):
    result = run([*tiny_train_args, f"data.store={store64}", "optim.steps=30", "optim.lr=0.002"])
    run_dir = tmp_path / "run"
    records = read_jsonl(run_dir / "metrics.jsonl")
    first, last = records[0]["loss_rec"], records[-1]["loss_rec"]
    assert last < 0.7 * first, (first, last)
    assert result["steps"] == 30 and np.isfinite(result["inpaint_psnr"])
    store = ImageStore(store64)
    recorded = json.loads((run_dir / "meta.json").read_text())["sources"]["data_store"]
    assert recorded["sha256"] == store.fingerprint and recorded["images"] == len(store)
    state = load_checkpoint(run_dir)
    assert state["data_store"] == recorded and state["config"]["data"]["store"] == str(store64)


@pytest.mark.parametrize(
    "extra",
    [
        ["method=autoencoder"],
        ["method=rotation"],
        ["mask.kind=central"],
        ["mask.kind=random_block"],
    ],
)
def test_other_masks_and_methods_train_from_the_store(tiny_train_args, store64, extra):
    result = run([*tiny_train_args, f"data.store={store64}", "optim.steps=3", *extra])
    assert result["steps"] == 3 and all(
        np.isfinite(v) for v in result.values() if isinstance(v, float)
    )


def _trained_batches(monkeypatch, args) -> list:
    """The (images, holes) batches the trainer stepped on, recorded as one_step gets them."""
    seen, real = [], ONE_STEP
    monkeypatch.setattr(
        engine, "one_step", lambda t, step, batch, r: seen.append(batch) or real(t, step, batch, r)
    )
    run(args)
    return seen


@pytest.mark.parametrize("batched_ops", [None, True])  # True: the GPU's batched ops, on the CPU
def test_trained_holes_have_the_per_image_coverage_and_config(
    tiny_train_args, store64, tmp_path, monkeypatch, batched_ops
):
    """What the wiring adds: the mask settings of the config reach the store's batches (here a
    max_coverage of 0.15), with the same coverage distribution as the per-image path trains on."""
    source = functools.partial(make_batched_source, batched_ops=batched_ops)
    monkeypatch.setattr(engine, "make_batched_source", source)
    args = [*tiny_train_args, "optim.steps=24", "mask.max_coverage=0.15", "mask.kind=random_block"]
    ref = _trained_batches(monkeypatch, args)
    other = [a.replace(str(tmp_path / "run"), str(tmp_path / "store_run")) for a in args]
    ours = _trained_batches(monkeypatch, [*other, f"data.store={store64}"])
    cover = [torch.cat([h.float().mean(dim=(1, 2, 3)) for _, h in b]).numpy() for b in (ref, ours)]
    assert len(cover[0]) == len(cover[1]) == 24 * 8
    assert cover[1].max() <= 0.15 and cover[1].min() >= 0.075  # target in [max/2, max]
    assert ks_2samp(*cover).pvalue > P_MIN
    for images, _ in ours:  # train views: uint8 crops of the network's input size
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64)
    assert not torch.equal(ours[0][0], ours[1][0])


def test_resume_from_the_store_gives_the_uninterrupted_weights(tiny_train_args, store64, tmp_path):
    store = [*tiny_train_args, f"data.store={store64}"]
    straight = [a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in store]
    run(straight)
    with pytest.raises(FloatingPointError):  # stop after 6 of 12 steps (checkpoint at 4)
        run([*store, "fail_at_step=6"])
    assert load_checkpoint(tmp_path / "run")["step"] == 4
    run([*store, "data.num_workers=2"])  # the batches do not depend on the number of workers
    a, b = (
        load_checkpoint(tmp_path / "straight")["model"],
        load_checkpoint(tmp_path / "run")["model"],
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref = {r["step"]: r["loss_rec"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")}
    assert {r["step"]: r["loss_rec"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")} == ref


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_store_of_other_data_is_refused_before_anything_is_written(
    tiny_train_args, tiny_voc, store64, tmp_path, capsys
):
    val = build(tiny_voc, tmp_path / "val64", StoreSettings("voc", "val", 64))
    small = build(tiny_voc, tmp_path / "s32", StoreSettings("voc", "train", 32))
    strict = build(tiny_voc, tmp_path / "strict", StoreSettings("voc", "train", 64, strict=True))
    cases = {
        val: "split: store 'val', config 'train'",
        small: "short_side: store 32, config 64",
        strict: "images.strict: store True, config False",
        tmp_path / "missing": "no such image store",
    }
    for path, words in cases.items():
        assert words in _refused([*tiny_train_args, f"data.store={path}"], capsys)
        assert not (tmp_path / "run").exists()
        checks = {
            c.key: c for c in input_checks(parse_config([*tiny_train_args, f"data.store={path}"]))
        }
        with pytest.raises(StoreError, match=words):  # the pre-flight's check of the same input
            checks["data.store"].check()
    input_checks(parse_config([*tiny_train_args, f"data.store={store64}"]))[-1].check()


def test_a_store_rebuilt_from_changed_sources_does_not_resume_a_run(
    tiny_train_args, tmp_path, tiny_voc, capsys
):
    voc = shutil.copytree(tiny_voc, tmp_path / "voc")
    path = build(voc, tmp_path / "s", StoreSettings("voc", "train", 64))
    args = [a if not a.startswith("data.root=") else f"data.root={voc}" for a in tiny_train_args]
    args = [*args, f"data.store={path}"]
    with pytest.raises(FloatingPointError):
        run([*args, "fail_at_step=6"])
    first = ImageStore(path).ids[0]
    jpeg = voc / "JPEGImages" / f"{first}.jpg"
    Image.open(jpeg).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(jpeg)
    assert "source files under" in _refused(args, capsys)  # the old store no longer matches
    shutil.rmtree(path)
    build(voc, path, StoreSettings("voc", "train", 64))
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    assert "data_store: sha256" in _refused(args, capsys)  # another store than the run's
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize(
    "method", ["relative_location", "supervised", "kmeans_init", "random_init"]
)
def test_methods_that_batch_single_images_refuse_the_store(tiny_train_args, store64, method):
    with pytest.raises(ConfigError, match=rf"data.store: method={method} takes no batches"):
        parse_config([*tiny_train_args, f"data.store={store64}", f"method={method}"])


def test_a_killed_store_run_resumes_to_the_uninterrupted_weights(
    tiny_train_args, store64, tmp_path
):
    """kill -9 after a checkpoint and a step past it; restarted, the same weights and losses."""
    args = [*tiny_train_args, f"data.store={store64}", "log_every=1"]
    straight = [a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in args]
    run(straight)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pretext.train", *args], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(r["step"] >= 6 for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, "no step 6"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "run")["step"] in (4, 8)
    run(args)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ref = {r["step"]: r["loss_rec"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")}
    assert {r["step"]: r["loss_rec"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")} == ref


def test_rotation_makes_its_four_rotations_on_the_store_batch(tiny_train_args):
    """method=rotation's store batch is RotatedImages' items stacked: image i's rotation k at
    [i, k], label k (the per-image path's order, which ClassificationStep flattens)."""
    from pretext.methods.rotation import rotations
    from pretext.train import build

    cfg = parse_config([*tiny_train_args, "method=rotation"])
    method = build(cfg, distributed.read_env()).method
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    turned, labels = method.store_batch(images, torch.zeros(3, 1, 64, 64, dtype=torch.bool))
    per_image = [rotations(im) for im in images]
    assert torch.equal(turned, torch.stack([x for x, _ in per_image]))
    assert torch.equal(labels, torch.stack([y for _, y in per_image]))
