"""A corpus of the mistakes and odd inputs real users bring (issue 23), run against every
``python -m`` entry point: each ends in a result or in one ``error:`` line naming the path or key,
exit 2, no traceback, nothing already written lost.

Generated here, tiny: a folder of photos in every mode and format Pillow reads (grayscale, LA,
palette GIF, RGBA, 16-bit, CMYK, PGM, BMP, WebP, TIFF, an EXIF-rotated JPEG, a text file beside
them), the same with bad files (empty, truncated, text named .png, too small), a file given where a
folder is expected and a folder where a file is, schedules shorter than their warm-up, a dataset
smaller than one batch, a box outside the image, split files naming missing files, VOC files with
unknown class names or without their annotation, and checkpoints of the wrong kind.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import save_checkpoint
from core.models import build_model

RNG = np.random.default_rng(23)


def photo(h: int = 72, w: int = 88) -> Image.Image:
    """A smooth random RGB image (so JPEG keeps it recognisable)."""
    small = RNG.random((h // 8 + 1, w // 8 + 1, 3))
    big = np.kron(small, np.ones((8, 8, 1)))[:h, :w]
    return Image.fromarray((big * 255).astype(np.uint8))


def rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: the stored 88x72 image is 72x88 upright
    photo().save(path, exif=exif, quality=90)


# file name -> writer; the source mode each is converted from (None: already RGB)
MIXED = {
    "rgb.jpg": (lambda p: photo().save(p, quality=90), None),
    "gray.png": (lambda p: photo().convert("L").save(p), "L"),
    "gray_alpha.png": (lambda p: photo().convert("LA").save(p), "LA"),
    "palette.gif": (lambda p: photo().convert("P").save(p), None),  # lossless: no conversion
    "rgba.png": (lambda p: photo().convert("RGBA").save(p), "RGBA"),
    "wide.png": (
        lambda p: Image.fromarray((RNG.random((72, 88)) * 65535).astype(np.uint16)).save(p),
        "I;16",
    ),
    "cmyk.jpg": (lambda p: photo().convert("CMYK").save(p), "CMYK"),
    "scan.pgm": (lambda p: photo().convert("L").save(p), "L"),
    "plain.bmp": (lambda p: photo().save(p), None),
    "web.webp": (lambda p: photo().save(p), None),
    "scan.tif": (lambda p: photo().save(p), None),
    "turned.jpg": (rotated_jpeg, None),
}
CONVERTED = {"L": 2, "LA": 1, "RGBA": 1, "I;16": 1, "CMYK": 1}


def truncated(path: Path) -> None:
    photo().save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "empty.jpg": lambda p: p.write_bytes(b""),
    "half.jpg": truncated,
    "notes.png": lambda p: p.write_text("a text file with an image's name\n" * 10),
    "thumb.png": lambda p: photo(12, 16).save(p),
}


def write_ckpt(path: Path, method: str = "context_encoder", trained: list[str] | None = None):
    torch.manual_seed(0)
    state = {
        "method": method, "arch": "small64", "output": "full", "dropout": 0.0,
        "model": build_model("small64").state_dict(), "discriminator": None, "optimizers": {},
        "step": 0, "rng": {}, "data_mean": [0.0, 0.0, 0.0],
        "config": {"mask": {"kind": "central", "overlap": 4}}, "elapsed_s": 0.0,
    }  # fmt: skip
    if trained is not None:
        state["trained"] = trained
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_voc) -> dict[str, Path]:
    """Every input of the corpus, written once (treat as read-only)."""
    tmp = tmp_path_factory.mktemp("corpus")
    out = {"tmp": tmp}
    mixed = tmp / "photos"
    for sub in ("train", "test"):
        (mixed / sub).mkdir(parents=True)
        for name, (make, _) in MIXED.items():
            make(mixed / sub / name)
    (mixed / "train" / "README.txt").write_text("not an image: counted and named in the log")
    out["mixed"] = mixed
    bad = tmp / "bad_photos"
    shutil.copytree(mixed, bad)
    for name, make in BAD.items():
        make(bad / "test" / name)
    out["bad"] = bad
    # split files: one naming a file that is not there, one that is no text at all
    (mixed / "listed.txt").write_text("test/rgb.jpg\ntest/missing.jpg\n")
    (mixed / "binary.txt").write_bytes(bytes(range(256)) * 4)
    out["image"] = mixed / "test" / "rgb.jpg"
    out["gray"] = mixed / "test" / "gray.png"
    # a mini-VOC whose images come in other modes (the bytes decide the format, not .jpg)
    voc = tmp / "mixed_voc" / "VOC2007"
    shutil.copytree(tiny_voc, voc)
    for split in ("trainval", "test"):
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        for image_id, mode in zip(ids, ("L", "RGBA", "CMYK")):
            path = voc / "JPEGImages" / f"{image_id}.jpg"
            im = Image.open(path).convert(mode)
            im.save(path, format="PNG" if mode == "RGBA" else "JPEG")
    out["mixed_voc"] = voc
    # VOC roots with an unknown class name, an entry without its XML / its segmentation PNG
    for name in ("unknown_voc", "no_xml_voc", "no_png_voc"):
        shutil.copytree(tiny_voc, tmp / name / "VOC2007")
        out[name] = tmp / name / "VOC2007"
    first = (tiny_voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[1]
    xml = out["unknown_voc"] / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{name}</name>", "<name>ship</name>", 1))
    out["unknown_xml"], out["first_id"] = xml, first
    (out["no_xml_voc"] / "Annotations" / f"{first}.xml").unlink()
    seg = (tiny_voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[2]
    (out["no_png_voc"] / "SegmentationClass" / f"{seg}.png").unlink()
    # checkpoints: a context encoder, a supervised one (old: no record), a recorded encoder-only
    out["ce"] = write_ckpt(tmp / "ce.pt")
    out["sup_old"] = write_ckpt(tmp / "sup.pt", "supervised")
    out["rot_new"] = write_ckpt(tmp / "rot.pt", "rotation", ["encoder", "head"])
    out["not_ckpt"] = tmp / "notes.pt"
    out["not_ckpt"].write_text("not a checkpoint")
    out["empty_run"] = tmp / "empty_run"
    out["empty_run"].mkdir()
    return out


def cases(c: dict[str, Path]) -> dict[str, tuple[str, list[str], str | None]]:
    """name -> (module, argv, words of the one error line; None: the run must succeed)."""
    tmp, mixed, voc = c["tmp"], c["mixed"], c["mixed_voc"]
    bench = [f"ce_l2={c['ce']}", "methods=[mean_fill,nn_hog,telea,ce_l2]"]
    ret = ["checkpoints.ce=" + str(c["ce"]), "layers=[pool5]", "ks=[1]", "approx=[]"]
    ret += ["query_split=test", "database_split=train", "grid_queries=2", "grid_k=2"]
    query = ["--checkpoint", str(c["ce"]), "--k", "2"]
    frozen = [f"checkpoint={c['ce']}", "svm.costs=[1.0]", "knn.k=3", "lowshot.k=[]"]
    frozen += ["layers=[conv5]"]
    det = [f"checkpoint={c['ce']}", "max_iters=3", "warmup_iters=1"]
    pre = ["data.num_workers=0", "optim.steps=2", "optim.warmup_steps=1", "eval_images=4"]
    pre += ["threads=1", "mask.kind=central", "optim.batch_size=4"]
    return {
        # ---- Table 1 ---------------------------------------------------------------------------
        "bench-mixed-folder": ("eval.inpainting_bench", [f"data={mixed}", *bench], None),
        "bench-strict": (
            "eval.inpainting_bench",
            [f"data={mixed}", *bench, "images.strict=true"],
            "refused by images.strict=true",
        ),  # fmt: skip
        "bench-bad-files": (
            "eval.inpainting_bench",
            [f"data={c['bad']}", *bench],
            "4 of 16 image files are bad",
        ),  # fmt: skip
        "bench-skip-bad": (
            "eval.inpainting_bench",
            [f"data={c['bad']}", *bench, "images.skip_bad=true"],
            None,
        ),  # fmt: skip
        "bench-data-is-a-file": (
            "eval.inpainting_bench",
            [f"data={c['image']}", *bench],
            "data is a file",
        ),  # fmt: skip
        "bench-split-names-missing": (
            "eval.inpainting_bench",
            [f"data={mixed}", *bench, "split=listed.txt"],
            "listed.txt: line 2 names",
        ),  # fmt: skip
        "bench-split-binary": (
            "eval.inpainting_bench",
            [f"data={mixed}", *bench, "split=binary.txt"],
            "not a text split file",
        ),  # fmt: skip
        "bench-supervised-ckpt": (
            "eval.inpainting_bench",
            [f"data={mixed}", f"ce_l2={c['sup_old']}"],
            "decoder was not trained",
        ),  # fmt: skip
        "bench-nn_ce-rotation-ckpt": (
            "eval.inpainting_bench",
            [f"data={mixed}", *bench, f"nn_features={c['rot_new']}", "methods=[nn_ce]"],
            "decoder was not trained",
        ),  # fmt: skip
        "bench-not-a-ckpt": (
            "eval.inpainting_bench",
            [f"data={mixed}", f"ce_l2={c['not_ckpt']}"],
            str(c["not_ckpt"]),
        ),  # fmt: skip
        "bench-ckpt-folder-without-ckpt": (
            "eval.inpainting_bench",
            [f"data={mixed}", f"ce_l2={c['empty_run']}"],
            str(c["empty_run"]),
        ),  # fmt: skip
        # ---- retrieval and query -------------------------------------------------------------
        "retrieval-mixed-folder": ("eval.retrieval", [f"data={mixed}", *ret], None),
        "retrieval-data-is-a-file": (
            "eval.retrieval",
            [f"data={c['image']}", *ret],
            "data is a file",
        ),
        "retrieval-bad-files": (
            "eval.retrieval",
            [f"data={c['bad']}", *ret],
            "image files are bad",
        ),
        "query-mixed-gray": (
            "eval.query",
            [*query, "--data", str(mixed), "--image", str(c["gray"])],
            None,
        ),  # fmt: skip
        "query-box-outside": (
            "eval.query",
            [*query, "--data", str(mixed), "--image", str(c["image"]), "--box", "0,0,6,70"],
            "--box 0,0,6,70: lies outside the centre crop",
        ),  # fmt: skip
        "query-image-is-a-folder": (
            "eval.query",
            [*query, "--data", str(mixed), "--image", str(mixed)],
            "a folder, not an image file",
        ),  # fmt: skip
        "query-image-is-text": (
            "eval.query",
            [*query, "--data", str(mixed), "--image", str(c["bad"] / "test" / "notes.png")],
            "not an image",
        ),  # fmt: skip
        "query-data-is-a-file": (
            "eval.query",
            [*query, "--data", str(c["image"]), "--image", str(c["image"])],
            "data is a file",
        ),  # fmt: skip
        # ---- frozen protocols -------------------------------------------------------------------
        "frozen-mixed-voc": ("eval.frozen", [f"data={voc}", *frozen], None),
        "frozen-not-a-ckpt": (
            "eval.frozen",
            [f"data={voc}", f"checkpoint={c['not_ckpt']}"],
            str(c["not_ckpt"]),
        ),  # fmt: skip
        "frozen-data-is-a-file": ("eval.frozen", [f"data={c['image']}", *frozen], str(c["image"])),
        # ---- transfer ----------------------------------------------------------------------------
        "detect-short-schedule": (
            "transfer.detect",
            [f"checkpoint={c['ce']}", "max_iters=20"],
            "max_iters: 20 must be larger than warmup_iters (50)",
        ),  # fmt: skip
        "segment-short-schedule": (
            "transfer.segment",
            [f"checkpoint={c['ce']}", "max_iters=50"],
            "max_iters: 50 must be larger than warmup_iters (50)",
        ),  # fmt: skip
        "detect-unknown-class": (
            "transfer.detect",
            [*det, f"data={c['unknown_voc']}"],
            f"{c['first_id']}.xml (ship)",
        ),  # fmt: skip
        "detect-entry-without-xml": (
            "transfer.detect",
            [*det, f"data={c['no_xml_voc']}"],
            "ImageSets/Main/trainval.txt: line 2",
        ),  # fmt: skip
        "segment-entry-without-png": (
            "transfer.segment",
            [*det, f"data={c['no_png_voc']}"],
            "ImageSets/Segmentation/train.txt: line 3",
        ),  # fmt: skip
        "classify-unknown-class": (
            "transfer.classify",
            [f"checkpoint={c['ce']}", f"data={c['unknown_voc']}"],
            "unknown class 'ship'",
        ),  # fmt: skip
        "classify-data-is-a-file": (
            "transfer.classify",
            [f"checkpoint={c['ce']}", f"data={c['image']}"],
            str(c["image"]),
        ),  # fmt: skip
        "classify-not-a-ckpt": (
            "transfer.classify",
            [f"checkpoint={c['not_ckpt']}"],
            str(c["not_ckpt"]),
        ),  # fmt: skip
        # ---- pretext -----------------------------------------------------------------------------
        "pretext-smaller-than-a-batch": (
            "pretext.train",
            [*pre, f"data.root={c['tmp'] / 'mixed_voc' / 'VOC2007'}", "optim.batch_size=4096"],
            "fewer than one batch of 4096",
        ),  # fmt: skip
        "pretext-mixed-folder": (
            "pretext.train",
            [*pre, "data.format=folder", f"data.root={mixed}", "data.val_split=test"],
            None,
        ),  # fmt: skip
        "pretext-root-is-a-file": (
            "pretext.train",
            [*pre, "data.format=folder", f"data.root={c['image']}"],
            str(c["image"]),
        ),  # fmt: skip
        "pretext-old-skip-key": (
            "pretext.train",
            [*pre, "data.skip_bad=true"],
            "unknown key(s) ['data.skip_bad']",
        ),  # fmt: skip
        "image_store-data-is-a-file": (
            "core.image_store",
            ["build", str(c["image"]), str(tmp / "store"), "--format", "folder"],
            str(c["image"]),
        ),  # fmt: skip
    }


NAMES = list(cases(defaultdict(lambda: Path("/corpus"))))  # the names need no files


def run_dir_args(module: str, run_dir: Path) -> list[str]:
    if module == "eval.query":
        return ["--cache-dir", str(run_dir / "cache")]
    if module == "core.image_store":
        return []
    return [f"run_dir={run_dir}"] + (
        [f"cache_dir={run_dir}_cache"] if module.startswith("eval.") else []
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_mistake_ends_in_a_result_or_one_error_line(fork_server, corpus, tmp_path, name):
    module, argv, words = cases(corpus)[name]
    run_dir = tmp_path / "run"
    pid, log = fork_server.start(module, [*argv, *run_dir_args(module, run_dir)])
    rc = fork_server.wait(pid, timeout=300)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if words is None:
        assert rc == 0 and not errors, text[-3000:]
        return
    assert rc == 2 and len(errors) == 1, (rc, text[-3000:])
    assert words in errors[0], errors[0]
    assert not (run_dir / "result.json").exists()
    if module != "eval.query":  # a check that needs no model runs before anything is written
        assert not (run_dir / "checkpoints").exists()


def result_of(fork_server, corpus, tmp_path, name) -> dict:
    module, argv, _ = cases(corpus)[name]
    run_dir = tmp_path / name
    pid, log = fork_server.start(module, [*argv, *run_dir_args(module, run_dir)])
    assert fork_server.wait(pid, timeout=300) == 0, log.read_text()[-3000:]
    return json.loads((run_dir / "result.json").read_text()), log.read_text()


def test_mixed_folder_through_table1_and_retrieval_counts_conversions(
    fork_server, corpus, tmp_path
):
    result, text = result_of(fork_server, corpus, tmp_path, "bench-mixed-folder")
    for role in ("split", "train_split"):
        for mode, n in CONVERTED.items():
            assert result[f"images/{role}/converted/{mode}"] == n
        assert result[f"images/{role}/used"] == len(MIXED)
    assert result["images/train_split/not_images"] == 1 and "README.txt" in text
    assert result["n_images"] == len(MIXED)
    result, _ = result_of(fork_server, corpus, tmp_path, "retrieval-mixed-folder")
    assert result["images/query_split/converted"] == sum(CONVERTED.values())
    assert result["n_queries"] == result["n_database"] == len(MIXED)


def test_skip_bad_counts_what_it_left_out(fork_server, corpus, tmp_path):
    result, text = result_of(fork_server, corpus, tmp_path, "bench-skip-bad")
    assert result["images/split/skipped_bad"] == len(BAD)
    assert result["images/split/used"] == len(MIXED) == result["n_images"]
    assert all(name in text for name in BAD)  # each named in the log


def test_frozen_protocols_on_a_mixed_voc(fork_server, corpus, tmp_path):
    result, _ = result_of(fork_server, corpus, tmp_path, "frozen-mixed-voc")
    for role in ("train", "test"):
        assert {result[f"images/{role}/converted/{m}"] for m in ("L", "RGBA", "CMYK")} == {1.0}


def test_pretext_batch_check_leaves_the_folder_restartable(fork_server, corpus, tmp_path):
    """The dataset-smaller-than-a-batch mistake writes nothing, so the corrected command runs in
    the same folder (it used to leave checkpoints/last.pt and refuse the fix as a changed config)."""
    module, argv, _ = cases(corpus)["pretext-smaller-than-a-batch"]
    run_dir = tmp_path / "run"
    pid, _ = fork_server.start(module, [*argv, f"run_dir={run_dir}"])
    assert fork_server.wait(pid) == 2 and not run_dir.exists()
    fixed = [a for a in argv if a != "optim.batch_size=4096"]
    pid, log = fork_server.start(module, [*fixed, f"run_dir={run_dir}"])
    assert fork_server.wait(pid) == 0, log.read_text()[-3000:]
    assert (run_dir / "result.json").is_file()
