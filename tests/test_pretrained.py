"""One loader of a pretrained checkpoint (core.pretrained), one split opener (core.splits), one
classifier head and VOC loss (core.classifier), used by every stage."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core import classifier, datasets
from core.checkpoint import CheckpointError, save_checkpoint
from core.classifier import Classifier, multilabel_bce
from core.models import ARCHS, build_model
from core.pretrained import Pretrained
from core.splits import SplitError, open_split


def write_checkpoint(path: Path, method: str = "context_encoder", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("small64")
    save_checkpoint(path, {
        "method": method, "arch": "small64", "output": "full", "dropout": 0.0,
        "model": model.state_dict(), "discriminator": None, "optimizers": {}, "step": 7,
        "rng": {}, "data_mean": [0.1, 0.2, 0.3], "config": {"mask": {"overlap": 4}},
        "elapsed_s": 0.0,
    })  # fmt: skip
    return path


@pytest.fixture()
def loads(monkeypatch) -> list:
    """Every torch.load call (its first argument) made while the test runs."""
    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: calls.append(f) or real(f, *a, **k))
    return calls


@pytest.fixture()
def opened(monkeypatch) -> list:
    """Every file opened for reading through pathlib while the test runs."""
    paths, real = [], Path.open
    monkeypatch.setattr(
        Path,
        "open",
        lambda self, mode="r", *a, **k: paths.append(self) or real(self, mode, *a, **k),
    )
    return paths


def test_the_file_is_read_once_and_described(tmp_path, loads, opened):
    path = write_checkpoint(tmp_path / "ce.pt")
    pre = Pretrained.load(path)
    nets = [pre.network(), pre.network(), pre.encoder()]
    assert len({id(next(n.parameters())) for n in nets}) == 3  # three separate copies
    assert len(loads) == 1 and opened.count(path) == 1  # networks come from the one state read
    assert pre.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (pre.method, pre.arch, pre.step, pre.data_mean) == (
        "context_encoder",
        "small64",
        7,
        [0.1, 0.2, 0.3],
    )
    assert pre.trained == ("encoder", "bottleneck", "decoder")  # METHOD_TRAINED of old files
    assert pre.config == {"mask": {"overlap": 4}}
    assert pre.source == {"path": str(path), "sha256": pre.sha256, "method": "context_encoder",
                          "arch": "small64", "step": 7}  # fmt: skip
    # a run folder names its checkpoints/last.pt, and the provenance says so
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "checkpoints" / "last.pt")
    assert Pretrained.load(run).source == {**pre.source, "path": str(run / "checkpoints/last.pt")}


def test_fresh_networks_match_the_arch_and_the_weights(tmp_path):
    path = write_checkpoint(tmp_path / "ce.pt", seed=3)
    pre = Pretrained.load(path)
    a, b = pre.network(), pre.network()
    reference = ARCHS["small64"]()
    assert type(a) is type(reference) and a.input_size == reference.input_size == 64
    saved = torch.load(path, weights_only=True)["model"]
    for key, value in a.state_dict().items():
        assert value.shape == reference.state_dict()[key].shape and torch.equal(value, saved[key])
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # fine-tuning one copy leaves the other untouched
    assert torch.equal(next(b.parameters()), saved[next(iter(saved))])
    encoder = pre.encoder()
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 96, 4, 4)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_bytes(b"not a torch file"), "cannot read checkpoint"),
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a context-encoder-suite"),
        (lambda p: None, "checkpoint not found"),
        (lambda p: p.mkdir(), "a folder without checkpoints/last.pt"),
    ],
    ids=["junk", "foreign", "missing", "empty folder"],
)
def test_a_bad_file_is_one_checkpoint_error_line(tmp_path, make, words):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointError, match=words) as err:
        Pretrained.load(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_arch_and_trained_parts_are_checked(tmp_path):
    path = write_checkpoint(tmp_path / "rand.pt", method="random_init")
    with pytest.raises(CheckpointError, match="'small64', but 'alexnet227' was asked for"):
        Pretrained.load(path, "alexnet227")
    pre = Pretrained.load(path, "")  # "": any arch
    with pytest.raises(CheckpointError, match="whose decoder was not trained"):
        pre.require_trained("decoder", "Table 1")
    assert isinstance(pre.alexnet_network("classification transfer"), type(ARCHS["small64"]()))


def test_classify_reads_its_checkpoint_once(tiny_voc, tmp_path, loads):
    from transfer import classify

    path = write_checkpoint(tmp_path / "ce.pt")
    cfg = classify.parse_config([
        f"--checkpoint={path}", f"--data={tiny_voc}", f"run_dir={tmp_path / 'cls'}",
        "modes=[finetune,linear_pool5]", "finetune.epochs=1", "finetune.batch_size=8",
        "linear.max_iter=2", "threads=1", "progress=false",
    ])  # fmt: skip
    result = classify.main(cfg)
    assert len(loads) == 1 and 0.0 <= result["finetune_mAP"] <= 1.0


# ---- open_split -----------------------------------------------------------------------------------


def test_open_split_of_a_voc_root(tiny_voc):
    images = open_split(tiny_voc, "val", 32, False)
    assert type(images) is datasets.VOCImages and images[0].shape == (3, 32, 32)
    labelled = open_split(tiny_voc, "val", 32, False, labels=True, fmt="voc")
    reference = datasets.VOCClassification(tiny_voc, "val", 32, False)
    assert labelled.ids == images.ids == reference.ids
    assert torch.equal(labelled.labels, reference.labels)
    assert torch.equal(labelled.difficult_only, reference.difficult_only)
    image, labels, difficult = labelled[0]
    assert torch.equal(image, images[0]) and torch.equal(labels, reference.labels[0])
    assert torch.equal(difficult, reference.difficult_only[0])


def test_open_split_of_class_folders(tiny_voc, tmp_path):
    photos = sorted((tiny_voc / "JPEGImages").glob("*.jpg"))[:6]
    for i, photo in enumerate(photos):
        target = tmp_path / "data" / "train" / ("cat" if i % 2 else "dog") / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    root = tmp_path / "data"
    auto = open_split(root, "train", 32, False)
    folder = open_split(root, "train", 32, False, fmt="folder")
    assert type(auto) is type(folder) is datasets.ImageFolderImages
    assert auto.ids == folder.ids and all(i.split("/")[0] in ("cat", "dog") for i in auto.ids)
    labelled = open_split(root, "train", 32, False, labels=True, fmt="folder")
    assert labelled.class_names == ("cat", "dog")
    assert [labelled.class_names[k] for k in labelled.labels] == [i.split("/")[0] for i in auto.ids]
    # fmt=folder falls back to the root itself when <root>/<split> is no folder
    assert open_split(root / "train", "val", 32, False, fmt="folder").ids == auto.ids
    (tmp_path / "list.txt").write_text("train/cat/" + Path(labelled.files[0]).name + "\n")
    with pytest.raises(SplitError, match="a split file has no labels"):
        open_split(root, str(tmp_path / "list.txt"), 32, False, labels=True)


# ---- one head, one VOC loss ---------------------------------------------------------------------


def test_one_head_serves_supervised_pretext_and_transfer():
    from pretext.methods import supervised
    from transfer import classify

    assert supervised.Classifier is classify.Classifier is classifier.Classifier
    encoder = ARCHS["small64"]().encoder
    fc = classify.FinetuneConfig(head="mlp", hidden=16, dropout=0.0)
    net = Classifier(encoder, 5, fc.head, fc.hidden, fc.dropout)
    assert [m.out_features for m in net.new_layers] == [16, 16, 5]
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    linear = Classifier(encoder, 5, "linear", 0, 0.0)
    assert [m.in_features for m in linear.new_layers] == [96 * 4 * 4]


def test_multilabel_bce_leaves_difficult_entries_out_and_divides_by_the_images():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    difficult = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    kept = [(2.0, 1.0), (0.5, 0.0), (0.0, 0.0), (3.0, 1.0)]  # (logit, label) not difficult-only
    terms = [F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y)) for x, y in kept]
    assert torch.allclose(multilabel_bce(logits, labels, difficult), sum(terms) / 2)  # per image
    assert torch.allclose(multilabel_bce(logits, labels, difficult, 4), sum(terms) / 4)


def test_a_file_named_twice_in_a_row_is_read_once_and_a_rewritten_one_again(tmp_path, loads):
    path = write_checkpoint(tmp_path / "ce.pt")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.pt"
    shutil.copy(path, last)
    first = Pretrained.load(run)
    again = Pretrained.load(last, "small64")  # the same file by another name: no second read
    assert len(loads) == 1 and again.sha256 == first.sha256
    assert (again.given, again.path, first.given) == (str(last), last, str(run))
    with pytest.raises(CheckpointError, match="arch is 'small64'"):
        Pretrained.load(last, "alexnet227")  # the arch check still applies to the memo
    torch.save({**torch.load(last, weights_only=True), "step": 9}, tmp_path / "new.pt")
    os.replace(tmp_path / "new.pt", last)  # rewritten in place: read again
    assert Pretrained.load(last).step == 9 and len(loads) == 3  # (+ the test's own torch.load)
