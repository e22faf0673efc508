"""Weights in and out (core.export): the torchvision AlexNet arch against torchvision itself, export ->
import bit-equal for every layout, a torchvision state dict through the frozen protocol and
classification transfer, strict key / shape errors as one ``error:`` line with exit status 2."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.transforms.functional import normalize

from core.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from core.cli import run_cli
from core.export import FORMATS, export_encoder, import_encoder, main
from core.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from core.pretrained import Pretrained

REPO = Path(__file__).resolve().parents[1]
ARCH = "alexnet224_torchvision"
MEAN = [0.1, -0.05, 0.2]


@pytest.fixture(scope="module")
def voc224(tmp_path_factory) -> Path:
    """A tiny mini-VOC whose images are large enough for a 224-px encoder (short side >= 112)."""
    from core import minivoc

    out = tmp_path_factory.mktemp("voc224")
    return minivoc.generate(out, n_images=24, seed=0, size_range=(120, 160), workers=1)


def suite_checkpoint(path: Path, arch: str = "small64", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, {
        "method": "context_encoder", "arch": arch, "output": "full", "dropout": 0.0,
        "model": build_model(arch).state_dict(), "discriminator": None, "optimizers": {},
        "step": 7, "rng": {}, "data_mean": MEAN, "config": {}, "elapsed_s": 0.0,
    })  # fmt: skip
    return path


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    """torchvision.models.alexnet with random weights (no download); built once (61M parameters)."""
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).state_dict()


def torchvision_state_dict(path: Path, state: dict[str, torch.Tensor], head: bool = True) -> Path:
    """``state`` saved as users save a torchvision model; ``head=False``: without the 58M-parameter
    ImageNet classifier (which the import leaves out anyway), to keep the file small."""
    torch.save({k: v for k, v in state.items() if head or k.startswith("features.")}, path)
    return path


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float()


def test_torchvision_arch_computes_torchvision_features(tv_state, tmp_path):
    """The imported encoder on the suite's [-1, 1] input = torchvision's AlexNet on its own
    ImageNet-normalised input, at every conv layer (after ReLU) and pool5."""
    src = torchvision_state_dict(tmp_path / "alexnet.pth", tv_state)
    import_encoder(src, tmp_path / "imported.pt", ARCH)
    pre = Pretrained.load(tmp_path / "imported.pt")
    encoder = pre.encoder()
    tv = torchvision.models.alexnet(weights=None).eval()
    tv.load_state_dict(torch.load(src, weights_only=True))
    u = pixels(2, 224)
    with torch.no_grad():
        ours = encoder.eval().forward_features(u / 127.5 - 1)
        x = normalize(u / 255, IMAGENET_MEAN, IMAGENET_STD)
        # torchvision's features: conv1 ReLU = [:2], conv2 = [:5], conv3 = [:8], conv4 = [:10], ...
        for name, end in (("conv1", 2), ("conv2", 5), ("conv3", 8), ("conv4", 10),
                          ("conv5", 12), ("pool5", 13)):  # fmt: skip
            ref = tv.features[:end](x)
            assert ours[name].shape == ref.shape, name
            torch.testing.assert_close(ours[name], ref, rtol=1e-4, atol=1e-5)
    assert ours["pool5"].shape == (2, 256, 6, 6)
    state = load_checkpoint(tmp_path / "imported.pt")
    assert state["method"] == pre.method == "imported" and state["arch"] == ARCH
    assert state["source"]["sha256"] == file_sha256(src)
    assert state["source"]["layout"] == "torchvision"
    assert state["source"]["ignored"] == [k for k in tv.state_dict() if k.startswith("classifier.")]
    # no --data-mean, no export record: ImageNet's mean in the suite's [-1, 1] units
    assert state["data_mean"] == pytest.approx([2 * m - 1 for m in IMAGENET_MEAN])


@pytest.mark.parametrize("layout", FORMATS)
def test_export_then_import_gives_identical_features(layout, tmp_path):
    ckpt = suite_checkpoint(tmp_path / "ce.pt")
    record = export_encoder(ckpt, tmp_path / "enc.pth", layout)
    assert record["source"]["sha256"] == file_sha256(ckpt) and record["arch"] == "small64"
    side = json.loads((tmp_path / "enc.pth.json").read_text())
    assert side == record and side["file_sha256"] == file_sha256(tmp_path / "enc.pth")
    result = import_encoder(tmp_path / "enc.pth", tmp_path / "back.pt", "small64")
    assert result["layout"] == layout and result["data_mean"] == MEAN  # exact, from the record
    a = Pretrained.load(ckpt).encoder()
    back = Pretrained.load(tmp_path / "back.pt")
    b = back.encoder()
    assert back.method == "imported" and back.data_mean == MEAN
    x = pixels(3, 64) / 127.5 - 1
    with torch.no_grad():
        fa, fb = a.eval().forward_features(x), b.eval().forward_features(x)
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name
    raw = torch.load(tmp_path / "enc.pth", weights_only=True)
    keys = {"state_dict": "conv1.weight", "torchvision": "features.0.weight",
            "mm": "backbone.encoder.conv1.weight"}  # fmt: skip
    flat = raw["state_dict"] if layout == "mm" else raw
    assert keys[layout] in flat and len(flat) == 10


def test_torchvision_export_loads_into_torchvision(tmp_path):
    ckpt = suite_checkpoint(tmp_path / "tv.pt", ARCH, seed=3)
    export_encoder(ckpt, tmp_path / "tv.pth", "torchvision")
    tv = torchvision.models.alexnet(weights=None).eval()
    missing, unexpected = tv.load_state_dict(torch.load(tmp_path / "tv.pth"), strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    encoder = Pretrained.load(ckpt).encoder()
    u = pixels(1, 224, seed=1)
    with torch.no_grad():
        ref = tv.features(normalize(u / 255, IMAGENET_MEAN, IMAGENET_STD))
        torch.testing.assert_close(encoder.eval()(u / 127.5 - 1), ref, rtol=1e-4, atol=1e-5)


def test_mm_export_is_a_pretrained_init_cfg(tmp_path):
    pytest.importorskip("mmdet")
    from transfer.mm_backbone import PretextAlexNet

    ckpt = suite_checkpoint(tmp_path / "ce.pt", seed=4)
    export_encoder(ckpt, tmp_path / "mm.pth", "mm")
    init = {"type": "Pretrained", "checkpoint": str(tmp_path / "mm.pth"), "prefix": "backbone."}
    backbone = PretextAlexNet(checkpoint=None, arch="small64", init_cfg=init)
    backbone.init_weights()
    expected = Pretrained.load(ckpt).encoder()
    got = backbone.encoder.state_dict()
    assert got.keys() == expected.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    # without an init_cfg, init_weights keeps the weights the checkpoint gave (as before)
    from_ckpt = PretextAlexNet(checkpoint=str(ckpt), arch="small64")
    before = {k: v.clone() for k, v in from_ckpt.encoder.state_dict().items()}
    from_ckpt.init_weights()
    assert all(torch.equal(from_ckpt.encoder.state_dict()[k], v) for k, v in before.items())


def test_torchvision_state_dict_runs_the_frozen_protocol(voc224, tv_state, tmp_path):
    from eval import frozen

    src = torchvision_state_dict(tmp_path / "alexnet.pth", tv_state)
    ckpt = tmp_path / "imported.pt"
    import_encoder(src, ckpt, ARCH, data_mean=[0.5, 0.5, 0.5])
    assert load_checkpoint(ckpt)["data_mean"] == [0.0, 0.0, 0.0]
    argv = [f"checkpoint={ckpt}", f"data={voc224}", f"run_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}", "svm.costs=[0.1,1.0]", "knn.k=5",
            "lowshot.k=[1]", "lowshot.samples=2"]  # fmt: skip
    result = frozen.main(frozen.parse_config(argv))
    # pooled dimensions by the rule of pool_spec (side round(sqrt(9216 / C)), capped at the map):
    # conv1 55x55x64 -> 12x12, conv2 27x27x192 -> 7x7, conv3 13x13x384 -> 5x5, conv4 / conv5
    # 13x13x256 -> 6x6; the bottleneck is the 6x6x256 channel-wise FC output, flattened
    dims = {"conv1": 64 * 144, "conv2": 192 * 49, "conv3": 384 * 25, "conv4": 256 * 36,
            "conv5": 256 * 36, "bottleneck": 256 * 36}  # fmt: skip
    for layer in frozen.LAYERS:
        assert result[f"dim_{layer}"] == dims[layer]
        assert 0 <= result[f"svm_{layer}_mAP"] <= 1 and 0 <= result[f"knn_{layer}_mAP"] <= 1
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["source"]["method"] == "imported" and meta["source"]["arch"] == ARCH
    assert meta["source"]["sha256"] == file_sha256(ckpt) and meta["image_size"] == 224


def test_torchvision_state_dict_runs_classification_transfer(voc224, tv_state, tmp_path):
    from transfer import classify

    src = torchvision_state_dict(tmp_path / "alexnet.pth", tv_state, head=False)
    import_encoder(src, tmp_path / "imported.pt", ARCH)
    cfg = classify.parse_config([
        f"--checkpoint={tmp_path / 'imported.pt'}", f"--data={voc224}",
        f"run_dir={tmp_path / 'cls'}", "modes=[finetune,linear_pool5]", "finetune.epochs=1",
        "finetune.batch_size=8", "linear.max_iter=10", "threads=1", "progress=false",
        "test_flip=false",
    ])  # fmt: skip
    result = classify.main(cfg)
    for mode in ("finetune", "linear_pool5"):
        assert 0.0 <= result[f"{mode}_mAP"] <= 1.0 and math.isfinite(result[f"{mode}_mAP"])


def _state(tmp_path: Path, tv_state: dict[str, torch.Tensor], change: str) -> Path:
    sd = {k: v for k, v in tv_state.items() if k.startswith("features.")}
    if change == "missing":
        del sd["features.3.bias"]
    elif change == "extra":
        sd["features.12.weight"] = torch.zeros(3)
    else:
        sd["features.6.weight"] = torch.zeros(256, 192, 3, 3)
    path = tmp_path / f"{change}.pth"
    torch.save(sd, path)
    return path


WORDS = {
    "missing": "missing keys [features.3.bias]",
    "extra": "unexpected keys [features.12.weight]",
    "shape": "shape mismatch [features.6.weight: file [256, 192, 3, 3], arch [384, 192, 3, 3]]",
}


@pytest.mark.parametrize("change", sorted(WORDS))
def test_bad_state_dict_is_one_error_line_and_exit_2(change, tv_state, tmp_path, capsys):
    src = _state(tmp_path, tv_state, change)
    out = tmp_path / "out.pt"
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["import", str(src), str(out), "--arch", ARCH])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {src}: does not fit arch {ARCH!r} (torchvision layout): {WORDS[change]}"
    ]
    assert not out.exists()


def test_cli_round_trip_and_refusals(tmp_path, capsys):
    """The command line: export and import, and the one-line errors (exit 2) of an existing OUT, an
    arch the layout cannot hold and an unknown arch; once through a real process."""
    ckpt = suite_checkpoint(tmp_path / "ce.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "core.export", str(ckpt), str(tmp_path / "enc.pth"),
         "--format", "torchvision"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "torchvision layout" in proc.stdout, proc.stderr
    run_cli(main, ["import", str(tmp_path / "enc.pth"), str(tmp_path / "back.pt"), "--arch",
                   "small64"])  # fmt: skip
    assert "data_mean from" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "back.pt")["method"] == "imported"
    enc, x = str(tmp_path / "enc.pth"), str(tmp_path / "x.pt")
    for args, words in (
        ([str(ckpt), enc], "enc.pth: exists; pass --force"),
        (["import", enc, x, "--arch", "inpaint128"],
         "torchvision layout (features.N) holds a max-pool AlexNet encoder only"),
        (["import", enc, x, "--arch", "resnet50"], "--arch 'resnet50': choose one of"),
        (["import", enc, x, "--arch", "small64", "--data-mean", "120", "110", "100"],
         "--data-mean [120.0, 110.0, 100.0]: three values in [0, 1]"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            run_cli(main, args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "x.pt").exists()
