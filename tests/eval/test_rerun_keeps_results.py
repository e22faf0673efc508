"""Results are never lost by a rerun (issue 23, item 5): ``force=true`` keeps the previous
result.json and its figures until the new ones replace them; a folder that never produced a
result or a checkpoint is restarted with a corrected config (logged); one that holds either keeps
the refusal. Also: checkpoints record the parts they trained (item 6)."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from core import run_folder
from core.checkpoint import METHOD_TRAINED, load_checkpoint, trained_parts
from core.images import BadImageError
from eval import retrieval
from pretext import train
from pretext.methods import METHODS


def corrupt_png_bytes(path) -> bytes:
    """The image at ``path`` as a PNG whose compressed data is damaged (its IEND is intact, so
    only a full decode finds it: after the pre-scan, inside the run)."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[200:400] = bytes(200)
    return bytes(data)


def retrieval_cfg(data, run_dir, cache, **kw) -> retrieval.Config:
    settings = dict(layers=("pool5",), ks=(1,), approx=(), grid_queries=2, grid_k=2)
    settings.update(kw, checkpoints={"ce": str(kw.pop("ckpt"))})
    return retrieval.Config(data=str(data), run_dir=str(run_dir), cache_dir=str(cache), **settings)


@pytest.fixture()
def damaged_voc(tiny_voc, tmp_path):
    """A copy of the tiny mini-VOC whose first train image fails only when decoded."""
    root = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc, root)
    first = (root / "ImageSets" / "Main" / "train.txt").read_text().split()[0]
    path = root / "JPEGImages" / f"{first}.jpg"
    path.write_bytes(corrupt_png_bytes(path))
    return root


def test_force_keeps_the_previous_result_and_grid_when_the_rerun_fails(
    tiny_voc, tiny_ckpt, damaged_voc, tmp_path
):
    run = tmp_path / "run"
    first = retrieval.retrieval_benchmark(
        retrieval_cfg(tiny_voc, run, tmp_path / "c", ckpt=tiny_ckpt)
    )
    grid = (run / "retrieval_grid_ce.png").read_bytes()
    config = (run / "config.yaml").read_text()
    forced = retrieval_cfg(damaged_voc, run, tmp_path / "c", ckpt=tiny_ckpt, force=True)
    with pytest.raises(BadImageError, match="corrupt image data"):
        retrieval.retrieval_benchmark(forced)
    assert json.loads((run / "result.json").read_text()) == first  # still there, unchanged
    assert (run / "retrieval_grid_ce.png").read_bytes() == grid
    assert (run / "config.yaml").read_text() == config  # it still describes result.json
    # the forced rerun that succeeds replaces all of them
    again = retrieval_cfg(tiny_voc, run, tmp_path / "c", ckpt=tiny_ckpt, force=True, grid_queries=1)
    second = retrieval.retrieval_benchmark(again)
    assert json.loads((run / "result.json").read_text()) == second
    assert "grid_queries: 1" in (run / "config.yaml").read_text()
    assert Image.open(run / "retrieval_grid_ce.png").size[1] == 68 + 14  # one query row + labels
    assert not run_folder.pending_dir(run).exists()


def test_a_folder_without_result_or_checkpoint_restarts_with_the_corrected_config(
    tiny_voc, tiny_ckpt, damaged_voc, tmp_path, caplog
):
    run = tmp_path / "run"
    with pytest.raises(BadImageError):
        retrieval.retrieval_benchmark(
            retrieval_cfg(damaged_voc, run, tmp_path / "c", ckpt=tiny_ckpt)
        )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "meta.json"]
    with caplog.at_level(logging.WARNING):
        result = retrieval.retrieval_benchmark(
            retrieval_cfg(tiny_voc, run, tmp_path / "c", ckpt=tiny_ckpt)
        )
    assert "restarting with a changed config (data:" in caplog.text
    assert "holds no result or checkpoint" in caplog.text
    assert json.loads((run / "result.json").read_text()) == result
    # with a result, the refusal stays
    with pytest.raises(run_folder.RunFolderError, match="started with a different config"):
        retrieval.retrieval_benchmark(retrieval_cfg(tiny_voc, run, tmp_path / "c", ckpt=tiny_ckpt,
                                                    grid_k=1))  # fmt: skip


def test_a_folder_holding_a_checkpoint_keeps_the_refusal(tmp_path):
    @__import__("dataclasses").dataclass
    class Cfg:
        lr: float = 0.1
        force: bool = False

    run = tmp_path / "run"
    run_folder.start(run, Cfg(), {})
    run_folder.check_unchanged(run, Cfg(lr=0.2), set())  # nothing produced: restarted
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(run_folder.RunFolderError, match="lr: 0.1 -> 0.2"):
        run_folder.check_unchanged(run, Cfg(lr=0.2), set())


def test_checkpoints_record_what_they_trained(tiny_voc, tmp_path):
    argv = [f"data.root={tiny_voc}", f"run_dir={tmp_path / 'run'}", "data.num_workers=0",
            "optim.batch_size=8", "optim.steps=1", "optim.warmup_steps=0", "eval_images=2",
            "threads=1", "mask.kind=central"]  # fmt: skip
    train.main(train.parse_config(argv))
    state = load_checkpoint(tmp_path / "run")
    assert state["trained"] == ["encoder", "bottleneck", "decoder"]
    # what an older checkpoint without the record is read as: its method's parts, the same
    # parts every method class says it sets
    assert set(METHOD_TRAINED) >= set(METHODS)
    for name, method in METHODS.items():
        assert METHOD_TRAINED[name] == tuple(method.trained_parts), name
    del state["trained"]
    assert trained_parts(state) == ("encoder", "bottleneck", "decoder")
    assert trained_parts({"method": "supervised"}) == ("encoder", "head")
    assert trained_parts({"method": "supervised", "trained": ["encoder"]}) == ("encoder",)


def test_strict_and_converted_features_are_the_same_on_rgb_data(tiny_voc, tiny_ckpt, tmp_path):
    """The built-in data are RGB: the intake rule changes nothing there (same pixels either way)."""
    from core.images import ImagesConfig
    from core.splits import open_split

    a = open_split(tiny_voc, "val", 64, False)
    b = open_split(tiny_voc, "val", 64, False, rule=ImagesConfig(strict=True))
    assert a.converted == {} and len(a) == len(b)
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    assert np.asarray(a[0]).dtype == np.uint8


def test_a_pretext_folder_saved_with_data_skip_bad_compares_as_images_skip_bad():
    saved = {"data": {"root": "r", "skip_bad": True}}
    renamed = train.RENAMED_KEYS
    same = {"data": {"root": "r"}, "images": {"skip_bad": True, "strict": False}}
    defaults = {"images": {"skip_bad": False, "strict": False}}
    assert run_folder.config_changes(saved, same, (), defaults, renamed=renamed) == []
    other = {"data": {"root": "r"}, "images": {"skip_bad": False, "strict": False}}
    changes = run_folder.config_changes(saved, other, (), defaults, renamed=renamed)
    assert changes == ["images.skip_bad: True -> False"]
