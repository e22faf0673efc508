"""FAISS retrieval: oracles with known neighbour order, hand-computed precision / recall, the
benchmark stage and the query CLI on a tiny index."""

import json

import numpy as np
import pytest
from PIL import Image

from core.index import build_index, search
from eval import query
from eval.retrieval import (
    Config,
    chance_precision,
    precision_at_k,
    recall_at_k,
    retrieval_benchmark,
)


def line_bank() -> np.ndarray:
    """Ten points on a line, x_i = (i, 0, 0, 0): the neighbour order of any query is known."""
    bank = np.zeros((10, 4), np.float32)
    bank[:, 0] = np.arange(10)
    return bank


def test_flat_l2_oracle_order_and_squared_distances():
    index = build_index(line_bank(), "flat", "l2")
    dist, ids = search(index, np.array([[3.2, 0, 0, 0], [9.9, 0, 0, 0]], np.float32), 4)
    assert ids.tolist() == [[3, 4, 2, 5], [9, 8, 7, 6]]
    np.testing.assert_allclose(dist[0], [0.04, 0.64, 1.44, 3.24], rtol=1e-5)


def test_flat_ip_oracle_largest_first():
    bank = np.eye(4, dtype=np.float32) * np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    dist, ids = search(build_index(bank, "flat", "ip"), np.ones((1, 4), np.float32), 4)
    assert ids.tolist() == [[3, 2, 1, 0]]
    np.testing.assert_allclose(dist[0], [4, 3, 2, 1])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_recall_one_on_separated_clusters(kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 100, size=(8, 16)).astype(np.float32)
    bank = (np.repeat(centres, 50, axis=0) + rng.normal(0, 1, size=(400, 16))).astype(np.float32)
    queries = (centres + rng.normal(0, 1, size=(8, 16))).astype(np.float32)
    _, exact = search(build_index(bank, "flat"), queries, 10)
    _, approx = search(build_index(bank, kind, nlist=8, nprobe=2), queries, 10)
    assert recall_at_k(approx, exact) == 1.0
    assert all(set(row) <= set(range(50 * c, 50 * c + 50)) for c, row in enumerate(exact.tolist()))


def test_precision_chance_and_recall_by_hand():
    q = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)  # the third query has no class: skipped
    db = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]], bool)
    nb = np.array([[0, 1], [1, 2], [0, 1]])
    # query 0: db0 shares class 0, db1 shares nothing -> 1/2; query 1: db1 (class 1), db2 (class 2) -> 2/2
    assert precision_at_k(nb, q, db) == pytest.approx(0.75)
    assert precision_at_k(nb[:, :1], q, db) == pytest.approx(1.0)
    # a random neighbour: query 0 shares with db0, db2 (2/4); query 1 with db1, db2 (2/4)
    assert chance_precision(q, db) == pytest.approx(0.5)
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 5, 6]])) == (
        pytest.approx((2 / 3 + 2 / 3) / 2)
    )


def test_unknown_index_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(line_bank(), "lsh")


def test_benchmark_writes_flat_finite_metrics_and_is_not_recomputed(tiny_voc, tiny_ckpt, tmp_path):
    cfg = Config(
        checkpoints={"ce": str(tiny_ckpt)}, data=str(tiny_voc), run_dir=str(tmp_path / "run"),
        layers=("pool5",), ks=(1, 3), cache_dir=str(tmp_path / "cache"), grid_queries=2, grid_k=3,
    )  # fmt: skip
    result = retrieval_benchmark(cfg)
    expected = {"ce/pool5/extract_s", "chance/precision", "n_queries", "n_database", "time_s"}
    expected |= {f"ce/pool5/precision@{k}" for k in (1, 3)}
    expected |= {f"ce/pool5/{kind}/recall@{k}" for kind in ("ivf", "hnsw") for k in (1, 3)}
    for role, n in (("query_split", 12), ("database_split", 24)):  # core.images' counts
        expected |= {f"images/{role}/{k}" for k in ("files", "used", "skipped_bad", "not_images")}
        expected.add(f"images/{role}/converted")
        assert result[f"images/{role}/used"] == n and result[f"images/{role}/converted"] == 0
    assert set(result) == expected
    assert all(np.isfinite(v) for v in result.values())
    assert 0 <= result["ce/pool5/precision@3"] <= 1
    assert result["n_queries"] == 12 and result["n_database"] == 24  # tiny mini-VOC: val / train
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    png = np.asarray(Image.open(tmp_path / "run" / "retrieval_grid_ce.png").convert("L"))
    header = png.shape[0] - 2 * 68  # query | #1 #2 #3 drawn above the rows
    assert png.shape[1] == 4 * 68 and 10 <= header <= 40
    assert all((png[:header, k * 68 : (k + 1) * 68] < 128).sum() > 5 for k in range(4))
    assert retrieval_benchmark(cfg) == result  # finished: read back, not recomputed


def test_query_cli_finds_the_image_itself_first_and_writes_the_grid(
    tiny_voc, tiny_ckpt, tmp_path, capsys
):
    image_id = (tiny_voc / "ImageSets" / "Main" / "val.txt").read_text().split()[0]
    out = tmp_path / "grid.png"
    argv = [
        "--checkpoint", str(tiny_ckpt), "--data", str(tiny_voc), "--split", "val",
        "--image", str(tiny_voc / "JPEGImages" / f"{image_id}.jpg"), "--k", "3",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    found = query.main(query.parse_config(argv))
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line[:3].strip()]
    assert [line[0] for line in lines[:3]] == ["1", "2", "3"]
    assert lines[0][1] == image_id and float(lines[0][2]) == pytest.approx(0, abs=1e-5)
    assert list(found) == [line[1] for line in lines[:3]]
    distances = list(found.values())
    assert distances == sorted(distances)
    # query + 3 neighbours, 64 px + 2 px padding, under a row of labels (query, #1 .. #3)
    assert Image.open(out).size == (4 * 68, 68 + 14)


def test_query_box_maps_into_the_eval_view():
    # 128 x 64 image (w x h) -> resized to 128 x 64 at S = 64 -> centre crop x in [32, 96)
    hole = query.box_to_view_hole((40, 10, 56, 30), height=64, width=128, size=64)
    ys, xs = np.nonzero(hole)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 23, 10, 29)
    with pytest.raises(ValueError, match="outside the centre crop"):
        query.box_to_view_hole((0, 0, 20, 20), height=64, width=128, size=64)


def _photo_folder(voc, out, splits, nested):
    """The VOC splits' photos as <out>/<split>/[<class>/]<id>.jpg (class: the first VOC object)."""
    from core import voc as voclib

    names = voclib.class_names(voc)
    for split in splits:
        for image_id in voclib.read_split(voc, split):
            cls = voclib.parse_annotation(voc / "Annotations" / f"{image_id}.xml", names)
            sub = f"{cls.objects[0].name}/" if nested else ""
            target = out / split / sub / f"{image_id}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((voc / "JPEGImages" / f"{image_id}.jpg").read_bytes())
    return out


def test_retrieval_on_class_subfolders_uses_the_folder_labels_and_flat_has_recall_only(
    tiny_voc, tiny_ckpt, tmp_path
):
    from eval.retrieval import dataset_labels

    # oracle: labels are one-hot over the union of both splits' class folders
    labels = dataset_labels(tmp_path, [["a/1.jpg", "b/2.jpg"], ["c/3.jpg"]], ["c/3.jpg", "a/1.jpg"])
    assert labels.tolist() == [[False, False, True], [True, False, False]]
    assert dataset_labels(tmp_path, [["1.jpg"], ["2.jpg"]], ["1.jpg"]) is None
    common = dict(
        checkpoints={"ce": str(tiny_ckpt)}, layers=("pool5",), ks=(1, 3),
        cache_dir=str(tmp_path / "cache"), grid_queries=2, grid_k=3,
    )  # fmt: skip
    nested = _photo_folder(tiny_voc, tmp_path / "nested", ("val", "train"), nested=True)
    result = retrieval_benchmark(Config(data=str(nested), run_dir=str(tmp_path / "r1"), **common))
    assert result["n_queries"] == 12 and result["n_database"] == 24
    assert 0 <= result["ce/pool5/precision@3"] <= 1 and 0 < result["chance/precision"] < 1
    flat = _photo_folder(tiny_voc, tmp_path / "flat", ("val", "train"), nested=False)
    result = retrieval_benchmark(Config(data=str(flat), run_dir=str(tmp_path / "r2"), **common))
    assert not any("precision" in k for k in result)
    assert {"ce/pool5/hnsw/recall@3", "n_queries", "n_database"} <= set(result)
    assert Image.open(tmp_path / "r2" / "retrieval_grid_ce.png").size[0] == 4 * 68


@pytest.mark.parametrize("layout", ["flat", "class_subfolders", "split_file"])
def test_query_on_an_image_folder_finds_the_image_itself(
    tiny_voc, tiny_ckpt, tmp_path, capsys, layout
):
    root = _photo_folder(tiny_voc, tmp_path / "photos", ("val",), nested=layout != "flat")
    split = []
    if layout == "split_file":
        listed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))[:5]
        (root / "db.txt").write_text("\n".join(listed) + "\n")
        split = ["--split", "db.txt"]
    image = sorted(root.rglob("*.jpg"))[0]
    argv = [
        "--checkpoint", str(tiny_ckpt), "--data", str(root), "--image", str(image), "--k", "2",
        "--cache-dir", str(tmp_path / "cache"), *split,
    ]  # fmt: skip
    found = query.main(query.parse_config(argv))
    first = next(iter(found))
    assert first == image.relative_to(root).as_posix() and found[first] == pytest.approx(
        0, abs=1e-5
    )
    assert len(found) == 2
