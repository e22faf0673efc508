"""The pretext methods (pretext/methods/): oracles for the rotation and relative-location batch
transforms, the loss of each going down on a fixed batch, each trained end to end through
``pretext.train.main`` with an exact resume and a checkpoint transfer can read."""

import itertools
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from core import checkpoint
from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint
from core.config import ConfigError
from core.data import sample_seed
from core.models import build_model
from core.pretrained import Pretrained
from pretext.methods import METHODS
from pretext.methods.base import Placement
from pretext.methods.relative_location import (
    NEIGHBOURS,
    PATCH_RMS,
    RelativeLocationConfig,
    cell_origin,
    cut_pair,
    image_size,
    pair_boxes,
)
from pretext.methods.rotation import RotatedImages, rotations
from pretext.train import Config, main, parse_config

ROOT = Path(__file__).parents[1]
NEW = {
    "rotation": ["method=rotation", "rotation.hidden=64"],
    "relative_location": ["method=relative_location", "relloc.hidden=64"],
}


def run(args):
    return main(parse_config(args))


# ---- rotation ---------------------------------------------------------------------------------


def test_rotation_labels_of_an_asymmetric_image():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    image[0, 0, 1] = 255  # one red pixel: top row, second column
    turned, labels = rotations(image)
    assert labels.tolist() == [0, 1, 2, 3]
    # counter-clockwise by k * 90 degrees, by hand: (r, c) -> (3 - c, r) -> (3 - r, 3 - c) -> (c, 3 - r)
    expected = [(0, 1), (2, 0), (3, 2), (1, 3)]
    for k, (r, c) in enumerate(expected):
        assert torch.nonzero(turned[k, 0]).tolist() == [[r, c]], k
        assert torch.equal(turned[k], torch.rot90(image, k, dims=(1, 2)))
    assert turned[:, 1:].sum() == 0  # only the red channel is lit


def test_rotated_items_are_the_seeded_view_in_four_rotations(tiny_voc):
    from core.datasets import VOCImages

    images = VOCImages(tiny_voc, "train", 64, train=True)
    items = RotatedImages(images)
    key = (3, sample_seed(0, 5, 1))
    x, y = items[key]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2, 3]
    view = super(RotatedImages, items).__getitem__(key)  # the plain seeded view
    assert all(torch.equal(x[k], torch.rot90(view, k, dims=(1, 2))) for k in range(4))
    assert torch.equal(items[key][0], x)  # a function of (index, sample seed)


# ---- relative location ------------------------------------------------------------------------


def test_relative_location_geometry_by_hand():
    c = RelativeLocationConfig(patch=32, gap=16, jitter=2)
    assert image_size(c) == 3 * 32 + 2 * 16 + 2 * 2 == 132
    assert [cell_origin(r, r, c) for r in range(3)] == [(2, 2), (50, 50), (98, 98)]
    # label -> (dy, dx) of the neighbour: reading order around the centre (deepcontext pos2lbl)
    assert NEIGHBOURS == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    still = np.zeros((2, 2), int)
    assert pair_boxes(0, still, c) == ((50, 50), (2, 2))
    assert pair_boxes(4, still, c) == ((50, 50), (50, 98))  # right
    assert pair_boxes(6, still, c) == ((50, 50), (98, 50))  # below
    # jitter: centre moved by (+2, -2), neighbour 'above' (label 1, cell (0, 1)) by (-2, +1)
    assert pair_boxes(1, np.array([[2, -2], [-2, 1]]), c) == ((52, 48), (0, 51))
    # every label under every extreme jitter: inside the image, the gap 16 +- 2 * 2 on the axis
    # of the offset, and the neighbour on the side its label says
    for label, shifts in itertools.product(range(8), itertools.product((-2, 2), repeat=4)):
        (t0, l0), (t1, l1) = pair_boxes(label, np.array(shifts).reshape(2, 2), c)
        for t, left in ((t0, l0), (t1, l1)):
            assert min(t, left) >= 0 and max(t, left) + 32 <= 132
        dy, dx = NEIGHBOURS[label]
        for d, a, b in ((dy, t0, t1), (dx, l0, l1)):
            if d == 0:
                assert abs(a - b) <= 4
            else:
                gap = (b - (a + 32)) if d > 0 else (a - (b + 32))
                assert 12 <= gap <= 20, (label, shifts, gap)


def test_cut_pair_takes_the_boxes_and_normalises_each_patch():
    c = RelativeLocationConfig(chroma="none", downsample_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 132, 132), dtype=torch.uint8, generator=gen)
    pair = cut_pair(image, 5, np.random.default_rng(7), c)
    shifts = np.random.default_rng(7).integers(-2, 3, size=(2, 2))  # the first draw of cut_pair
    assert pair.shape == (2, 3, 32, 32) and pair.dtype == torch.float32
    for patch, (t, left) in zip(pair, pair_boxes(5, shifts, c)):
        crop = image[:, t : t + 32, left : left + 32].double() / 127.5 - 1
        crop = crop - crop.mean(dim=(1, 2), keepdim=True)
        expected = crop * PATCH_RMS / crop.pow(2).mean().sqrt()
        assert torch.allclose(patch.double(), expected, atol=1e-5)
        assert float(patch.pow(2).mean().sqrt()) == pytest.approx(PATCH_RMS, rel=1e-5)


def test_colour_dropping_keeps_one_channel_and_projection_removes_green_magenta():
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 132, 132), dtype=torch.uint8, generator=gen)
    drop = cut_pair(image, 2, np.random.default_rng(3), RelativeLocationConfig(chroma="drop"))
    for patch in drop:
        std = patch.flatten(1).std(1)
        kept = int(std.argmax())
        others = [i for i in range(3) if i != kept]
        assert (std[others] < std[kept] / 50).all()  # noise at 1/100 of the kept channel's std
    proj = cut_pair(image, 2, np.random.default_rng(3), RelativeLocationConfig(chroma="project"))
    green_magenta = torch.tensor([-1.0, 2.0, -1.0])
    assert torch.einsum("c,nchw->nhw", green_magenta, proj).abs().max() < 1e-5


def test_relative_location_config_checks():
    with pytest.raises(ConfigError, match="gap >= 2 \\* jitter"):
        parse_config(["method=relative_location", "relloc.gap=3", "relloc.jitter=2"])
    with pytest.raises(ConfigError, match="loss.adversarial applies"):
        parse_config(["method=relative_location", "loss.adversarial=true"])


# ---- every method -----------------------------------------------------------------------------


def test_methods_are_the_config_choices_and_the_trainer_has_no_method_branches():
    assert set(typing.get_args(typing.get_type_hints(Config)["method"])) == set(METHODS)
    # the format's list of method names: every pretext method, and encoders imported by core.export
    assert set(checkpoint.METHODS) == set(METHODS) | {"imported"}
    for name in ("pretext/train.py", "pretext/engine.py"):
        text = (ROOT / name).read_text()
        assert not re.search(r"method\s*(==|!=|in)\s*[\"'(]", text), name


@pytest.mark.parametrize("method", list(NEW))
def test_loss_goes_down_on_a_fixed_batch(tiny_voc, method):
    cfg = parse_config([*NEW[method], f"data.root={tiny_voc}"])
    torch.manual_seed(0)
    m = METHODS[method](cfg, build_model("small64"))
    items = m.items()
    batch = [items[(i, sample_seed(0, 0, i))] for i in range(8)]
    x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    cpu = Placement(torch.device("cpu"), None, torch.contiguous_format)
    step = m.make_step(m.net, opt, None, torch.zeros(3), cpu)
    losses = [step(x, y)["loss"] for _ in range(20)]
    assert losses[0] > 0.9 * np.log(4 if method == "rotation" else 8)  # near chance at the start
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", list(NEW))
def test_trains_end_to_end_resumes_exactly_and_loads_for_transfer(
    tiny_train_args, tmp_path, method
):
    straight = [
        a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in tiny_train_args
    ]
    result = run([*straight, *NEW[method]])
    metric = {"rotation": "val_rotation_acc", "relative_location": "val_relloc_acc"}[method]
    assert 0.0 <= result[metric] <= 1.0 and result["steps"] == 12 and "final_loss" in result
    assert not (tmp_path / "straight" / "inpainting.json").exists()  # no decoder trained
    with pytest.raises(FloatingPointError, match="at step 6"):
        run([*tiny_train_args, *NEW[method], "fail_at_step=6"])
    assert load_checkpoint(tmp_path / "run")["step"] == 4
    assert run([*tiny_train_args, *NEW[method]]) == pytest.approx(
        {
            **result,
            "train_time_s": pytest.approx(0, abs=1e9),
            "images_per_s": pytest.approx(0, abs=1e9),
        }
    )
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    assert a["method"] == method and "head" in a
    for key in ("model", "head"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == sorted(set(steps))
    pre = Pretrained.load(tmp_path / "run")  # what every transfer protocol reads
    network = pre.network()
    encoder = network.encoder
    assert pre.method == method and network.input_size == 64
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 96, 4, 4)
    trained = encoder.state_dict()
    torch.manual_seed(0)  # the run's seed: the network before training
    fresh = build_model("small64").encoder.state_dict()
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)


def test_resume_with_dropout_is_exact(tiny_train_args, tmp_path):
    # the loader's base-seed draw on the global RNG must not shift the dropout masks on resume
    sup = ["method=supervised", "head.hidden=32", "head.dropout=0.5"]
    straight = [
        a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in tiny_train_args
    ]
    run([*straight, *sup])
    with pytest.raises(FloatingPointError):
        run([*tiny_train_args, *sup, "fail_at_step=6"])
    run([*tiny_train_args, *sup])
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    for key in ("model", "head"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_kmeans_init_sets_the_encoder_from_data_and_records_it(tiny_train_args, tmp_path):
    args = [
        *tiny_train_args,
        "method=kmeans_init",
        "kmeans.images=16",
        "kmeans.init.max_patches=500",
    ]
    result = run(args)
    assert result["steps"] == 0 and result["init_images"] == 16
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert f"init_{layer}_kmeans_iters" in result and result[f"init_{layer}_final_std"] > 0
    assert (tmp_path / "run" / "init.json").exists()
    state = load_checkpoint(tmp_path / "run")
    assert state["method"] == "kmeans_init" and state["step"] == 0
    # the same seed's random init is the starting point; every conv is replaced
    torch.manual_seed(0)
    fresh = build_model("small64").encoder.state_dict()
    pre = Pretrained.load(tmp_path / "run")
    encoder = pre.encoder()
    assert pre.method == "kmeans_init"
    for k, v in encoder.state_dict().items():
        if k.startswith("conv") and k.endswith("weight"):
            assert not torch.equal(v, fresh[k]), k
    # deterministic: a second run in another folder gives the same weights bit for bit
    again = [a.replace(str(tmp_path / "run"), str(tmp_path / "again")) for a in args]
    run(again)
    b = load_checkpoint(tmp_path / "again")
    assert all(torch.equal(state["model"][k], b["model"][k]) for k in state["model"])
    # killed after the step-0 checkpoint, before result.json: the rerun still records the init
    (tmp_path / "again" / "result.json").unlink()
    (tmp_path / "again" / "init.json").unlink()
    rerun = run(again)
    assert {k: v for k, v in rerun.items() if k.startswith("init_") and k != "init_time_s"} == {
        k: v for k, v in result.items() if k.startswith("init_") and k != "init_time_s"
    }


@pytest.mark.parametrize("bad", ["kmeans.images=0", "kmeans.init.max_patches=0"])
def test_kmeans_init_refuses_an_empty_sample(tiny_train_args, bad):
    with pytest.raises(ConfigError, match="must be at least 1"):
        parse_config([*tiny_train_args, "method=kmeans_init", bad])
