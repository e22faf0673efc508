"""A decoded image store: every image of a split decoded once, short side resized, in one file.

    python -m core.image_store build data/minivoc_pretrain/VOC2007 stores/pretrain64 --short-side 64
    python -m core.image_store build /datasets/imagenet stores/in227 --format folder --short-side 227

Later epochs read bytes instead of decoding JPEGs. An image is decoded by
``core.images.load_rgb`` (the same intake rule, ``--images.strict`` / ``--images.skip_bad`` and
``min_size`` rules as training: a
short side below ``short_side // 2`` is bad), then its short side is resized to ``short_side``
(PIL bilinear, long side ``round(w * k)``: the resize of ``core.datasets.eval_view``, before its
centre crop) and stored whole, uint8 [h, w, 3], so random resized crops can be taken from it.

A store is a folder:

    images.u8    every image's bytes back to back (read through numpy.memmap)
    index.npz    offsets, shapes [n, 3], source position of each image; size and mtime_ns of
                 every source file
    meta.json    settings, data root, ids, sources fingerprint (sha256 of the source files' paths,
                 sizes and mtimes), skipped files

It is built in ``.<name>.partial`` beside it and renamed when complete, so a store is either
whole or absent. A killed build resumes: images are appended in chunks, each chunk's bytes fsynced
before its per-image records (``records.bin``), so the records say how much is good; a rerun
truncates what follows and goes on. A store (or partial store) made from other data or settings
is refused with one ``error:`` line, never overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.atomic_io import append_jsonl, atomic_save, atomic_write_json, read_jsonl
from core.cli import ArgumentParser, UserError, run_cli
from core.images import BadImageError, load_rgb

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: other modes converted to RGB by default, EXIF orientation applied
RECORD = np.dtype([("source", "<i8"), ("offset", "<i8"), ("h", "<i4"), ("w", "<i4")])
CHUNK_IMAGES = 256  # images per fsynced chunk: a kill loses at most this much work


class StoreError(UserError):
    """A store that cannot be used or built; the message is '<store>: <problem>'."""


@dataclass(frozen=True)
class StoreSettings:
    """What decides a store's bytes; a store is reused only when these (and its sources) match."""

    format: str  # voc | folder
    split: str
    short_side: int
    strict: bool = False  # core.images: refuse non-RGB instead of converting
    skip_bad: bool = False

    @property
    def min_size(self) -> int:
        return self.short_side // 2  # the training rule: more than 2x upsampling is a bad image


def source_files(
    root: str | Path, fmt: str, split: str, skip_bad: bool, strict: bool, min_size: int
):
    """(files, ids, skipped) of ``split`` as the pretext stage lists them (core.datasets)."""
    from core.datasets import ImageFolderImages, VOCImages

    root = Path(root)
    if fmt == "voc":
        ds = VOCImages(root, split, min_size * 2, False, skip_bad, strict, min_size)
    elif fmt == "folder":
        folder = root / split if (root / split).is_dir() else root  # as pretext.train does
        ds = ImageFolderImages(folder, min_size * 2, False, skip_bad, strict, min_size)
    else:
        raise StoreError(f"{root}: unknown format {fmt!r}; choose voc or folder")
    return ds.files, ds.ids, ds.skipped


def _stat(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    sizes, mtimes = np.empty(len(files), np.int64), np.empty(len(files), np.int64)
    for k, f in enumerate(files):
        st = os.stat(f)
        sizes[k], mtimes[k] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def sources_fingerprint(root: Path, files: Sequence[str], sizes, mtimes) -> str:
    """sha256 of the sources' paths (relative to root), sizes and mtimes: cheap to recompute."""
    h = hashlib.sha256()
    for f, s, m in zip(files, sizes.tolist(), mtimes.tolist()):
        h.update(f"{os.path.relpath(f, root)}\0{s}\0{m}\n".encode())
    return h.hexdigest()


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [H, W, 3] -> short side ``short_side`` (PIL bilinear), the geometry of eval_view."""
    h, w = image.shape[:2]
    k = short_side / min(h, w)
    nw, nh = max(short_side, round(w * k)), max(short_side, round(h * k))
    if (nh, nw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))


def _decode(job: tuple[int, str, int, int, bool]) -> tuple[int, np.ndarray | str]:
    """(source position, resized image or the reason it is bad); runs in the pool's workers."""
    pos, path, short_side, min_size, strict = job
    try:
        return pos, np.ascontiguousarray(
            resize_short_side(load_rgb(path, min_size, strict), short_side)
        )
    except (BadImageError, FileNotFoundError) as e:
        return pos, e.problem if isinstance(e, BadImageError) else "file not found"


def _meta_head(root: Path, settings: StoreSettings, fingerprint: str, n_sources: int) -> dict:
    return {"version": FORMAT_VERSION, "root": str(root), "settings": asdict(settings),
            "sources_sha256": fingerprint, "n_sources": n_sources}  # fmt: skip


def _differences(found: dict, wanted: dict) -> list[str]:
    keys = ("version", "root", "settings", "sources_sha256", "n_sources")
    out = []
    for k in keys:
        a, b = found.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{s} {a.get(s)!r}, asked {b.get(s)!r}" for s in b if a.get(s) != b.get(s)]
        elif a != b:
            out.append(
                f"{k} {a!r}, asked {b!r}" if k != "sources_sha256" else "source files changed"
            )
    return out


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def build(
    data: str | Path,
    out: str | Path,
    settings: StoreSettings,
    workers: int = 0,
    kill_after: int = -1,
    chunk_images: int = CHUNK_IMAGES,
) -> Path:
    """Build (or resume, or confirm up to date) the store of ``data`` at ``out``; returns ``out``.

    ``kill_after`` (testing aid): SIGKILL this process once that many images are written, after
    their bytes and before their records, the worst place for a kill."""
    root, out = Path(data).resolve(), Path(out)
    if settings.format == "voc":
        from core.data import ensure_builtin

        ensure_builtin(data)
    files, ids, skipped = source_files(root, settings.format, settings.split, settings.skip_bad,
                                       settings.strict, settings.min_size)  # fmt: skip
    sizes, mtimes = _stat(files)
    head = _meta_head(root, settings, sources_fingerprint(root, files, sizes, mtimes), len(files))
    if out.exists():
        found = _read_meta(out)
        diff = _differences(found, head)
        if diff:
            raise StoreError(f"{out}: a store built from other data or settings ({'; '.join(diff)}); "
                             "choose another OUT or delete it")  # fmt: skip
        log.info("%s is up to date (%d images)", out, found["n_images"])
        return out
    part = partial_dir(out)
    part.mkdir(parents=True, exist_ok=True)
    if (part / "meta.json").exists():
        diff = _differences(_read_meta(part), head)
        if diff:
            raise StoreError(f"{part}: a partial store from other data or settings ({'; '.join(diff)}); "
                             "delete it or resume it with its settings")  # fmt: skip
    else:
        atomic_write_json(part / "meta.json", {**head, "complete": False})
    records = _resume_records(part)
    # a bad image found after the last committed chunk is decoded (and logged) again: dedupe on finish
    start = int(records["source"][-1]) + 1 if len(records) else 0
    if start:
        log.info(
            "resuming %s at source %d of %d (%d images stored)",
            part,
            start,
            len(files),
            len(records),
        )
    end = _end(records)
    jobs = [(p, files[p], settings.short_side, settings.min_size, settings.strict)
            for p in range(start, len(files))]  # fmt: skip
    with open(part / "images.u8", "ab") as data_fh, open(part / "records.bin", "ab") as rec_fh:
        written = len(records)
        for chunk in _chunks(_decoded(jobs, workers), chunk_images):
            rows = []
            skip_log = part / "skipped.jsonl"
            for pos, image in chunk:
                if isinstance(image, str):
                    if not settings.skip_bad:
                        raise BadImageError(files[pos], image)
                    append_jsonl(skip_log, {"pos": pos, "file": files[pos], "reason": image})
                    continue
                data_fh.write(image.tobytes())
                rows.append((pos, end, image.shape[0], image.shape[1]))
                end += image.nbytes
            data_fh.flush()
            os.fsync(data_fh.fileno())
            written += len(rows)
            if 0 <= kill_after <= written:
                os.kill(os.getpid(), signal.SIGKILL)
            rec_fh.write(np.array(rows, RECORD).tobytes())
            rec_fh.flush()
            os.fsync(rec_fh.fileno())
    _finish(
        part, out, head, files, ids, sizes, mtimes, skipped + _late_skips(part / "skipped.jsonl")
    )
    return out


def _late_skips(path: Path) -> list[tuple[str, str]]:
    """Files that failed to decode, once each, in source order."""
    by_pos = {r["pos"]: (r["file"], r["reason"]) for r in read_jsonl(path)}
    return [by_pos[p] for p in sorted(by_pos)]


def _end(records: np.ndarray) -> int:
    """Byte offset just past the last recorded image."""
    if not len(records):
        return 0
    return int(records["offset"][-1]) + 3 * int(records["h"][-1]) * int(records["w"][-1])


def _decoded(jobs: list, workers: int) -> Iterator[tuple[int, np.ndarray | str]]:
    if workers <= 0 or len(jobs) < 2 * CHUNK_IMAGES:
        yield from map(_decode, jobs)
        return
    with get_context("spawn").Pool(workers) as pool:  # spawn: no fork of a threaded parent
        yield from pool.imap(_decode, jobs, chunksize=16)


def _chunks(items: Iterator, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _resume_records(part: Path) -> np.ndarray:
    """The complete records of a partial store; truncates a torn record and orphan image bytes."""
    rec_path, data_path = part / "records.bin", part / "images.u8"
    raw = rec_path.read_bytes() if rec_path.exists() else b""
    n = len(raw) // RECORD.itemsize
    records = np.frombuffer(raw[: n * RECORD.itemsize], RECORD).copy()
    end = _end(records)
    with open(rec_path, "ab") as fh:
        fh.truncate(n * RECORD.itemsize)
    with open(data_path, "ab") as fh:
        if fh.tell() < end:
            raise StoreError(
                f"{data_path}: shorter ({fh.tell()} bytes) than its records say ({end})"
            )
        fh.truncate(end)
    return records


def _finish(part, out, head, files, ids, sizes, mtimes, skipped) -> None:
    records = _resume_records(part)
    pos = records["source"]
    shapes = np.stack([records["h"], records["w"], np.full(len(records), 3, np.int32)], 1)

    def write(fh) -> None:
        np.savez(fh, offsets=records["offset"], shapes=shapes.astype(np.int32), source=pos,
                 source_sizes=sizes, source_mtimes=mtimes)  # fmt: skip

    atomic_save(part / "index.npz", write)
    id_of = {f: i for f, i in zip(files, ids)}
    meta = {**head, "complete": True, "n_images": int(len(records)),
            "bytes": int((part / "images.u8").stat().st_size),
            "ids": [id_of[files[p]] for p in pos.tolist()],
            "skipped": [list(s) for s in skipped]}  # fmt: skip
    atomic_write_json(part / "meta.json", meta)
    for name in ("records.bin", "skipped.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            (part / name).unlink()
    os.rename(part, out)  # the store appears whole or not at all
    log.info("wrote %s: %d images, %.1f MiB", out, meta["n_images"], meta["bytes"] / 2**20)


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{folder}: not an image store (no meta.json)") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: unreadable ({e})") from None


class ImageStore:
    """A built store, memory-mapped: ``store.image(i)`` is uint8 [h, w, 3] (a view, no copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        if not self.meta.get("complete") or self.meta.get("version") != FORMAT_VERSION:
            raise StoreError(f"{self.path}: not a complete version-{FORMAT_VERSION} image store")
        with np.load(self.path / "index.npz") as index:
            self.offsets, self.shapes = index["offsets"], index["shapes"]
            self.source_sizes, self.source_mtimes = index["source_sizes"], index["source_mtimes"]
        self.settings = StoreSettings(**self.meta["settings"])
        self.ids: list[str] = self.meta["ids"]
        data = self.path / "images.u8"
        if data.stat().st_size != self.meta["bytes"]:
            raise StoreError(
                f"{data}: {data.stat().st_size} bytes, the index says {self.meta['bytes']}"
            )
        self.data = np.memmap(data, np.uint8, "r") if self.meta["bytes"] else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:  # to a worker process: reopen, never copy the data
        return {k: v for k, v in self.__dict__.items() if k != "data"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        data = self.path / "images.u8"
        self.data = np.memmap(data, np.uint8, "r") if self.meta["bytes"] else np.zeros(0, np.uint8)

    def image(self, i: int) -> np.ndarray:
        h, w, c = self.shapes[i]
        o = int(self.offsets[i])
        return self.data[o : o + h * w * c].reshape(h, w, c)

    @property
    def fingerprint(self) -> str:
        """sha256 of meta.json and index.npz: which build of which sources this is (cheap: the
        image bytes are not read; a rebuild writes another meta.json)."""
        h = hashlib.sha256()
        for name in ("meta.json", "index.npz"):
            h.update((self.path / name).read_bytes())
        return h.hexdigest()

    def check(
        self,
        root: str | Path,
        fmt: str,
        split: str,
        short_side: int,
        verify_sources: bool = True,
        strict: bool | None = None,
        skip_bad: bool | None = None,
    ) -> None:
        """Raise StoreError unless this store was built from ``root``/``split`` at ``short_side``
        (and, when given, under the intake rule ``strict`` / ``skip_bad``) from source files that
        are unchanged (sizes and mtimes; ``verify_sources`` stats them all)."""
        s, root = self.settings, Path(root).resolve()
        wanted = {
            "root": str(Path(root).resolve()),
            "format": fmt,
            "split": split,
            "short_side": short_side,
        }
        found = {
            "root": self.meta["root"],
            "format": s.format,
            "split": s.split,
            "short_side": s.short_side,
        }
        for key, value in (("images.strict", strict), ("images.skip_bad", skip_bad)):
            if value is not None:
                wanted[key], found[key] = value, getattr(s, key.split(".")[1])
        diff = [
            f"{k}: store {found[k]!r}, config {wanted[k]!r}"
            for k in wanted
            if found[k] != wanted[k]
        ]
        if diff:
            raise StoreError(f"{self.path}: built from other data or settings ({'; '.join(diff)})")
        if verify_sources:
            files, _, _ = source_files(root, fmt, split, s.skip_bad, s.strict, s.min_size)
            sizes, mtimes = _stat(files)
            if (
                sources_fingerprint(Path(root).resolve(), files, sizes, mtimes)
                != self.meta["sources_sha256"]
            ):
                raise StoreError(f"{self.path}: the source files under {root} changed since the store "
                                 "was built; rebuild it")  # fmt: skip


class StoreImages:
    """A store as the per-image datasets of core.datasets see it: item uint8 [3, S, S], the train
    view (random resized crop + flip from torch's RNG) or the eval view (centre crop), S = the
    store's short side. Eval views are the same pixels as from the source files (the store did
    eval_view's resize); train views crop the resized image instead of the original."""

    def __init__(self, store: ImageStore, train: bool):
        self.store, self.train, self.image_size = store, train, store.settings.short_side
        self.ids, self.skipped = store.ids, list(store.meta["skipped"])

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int):
        import torch

        from core.datasets import eval_view, train_view

        view = train_view if self.train else eval_view
        out = view(np.asarray(self.store.image(index)), self.image_size)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(prog="python -m core.image_store", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="decode and resize a split into a store (resumes a killed build)"
    )
    b.add_argument("data", help="VOC root (VOC2007 layout) or image folder")
    b.add_argument("out", help="the store folder to write")
    b.add_argument(
        "--short-side", type=int, default=64, help="px; the network's input size (64, 128, 227)"
    )
    b.add_argument("--split", default="train")
    b.add_argument("--format", choices=("voc", "folder"), default="voc")
    b.add_argument(
        "--images.strict",
        dest="strict",
        action="store_true",
        help="refuse non-RGB images instead of converting them (core.images)",
    )
    b.add_argument("--images.skip_bad", "--skip-bad", dest="skip_bad", action="store_true",
                   help="leave bad images out (listed in meta.json)")  # fmt: skip
    b.add_argument("--workers", type=int, default=0, help="decode processes (0: this one)")
    b.add_argument("--kill-after", type=int, default=-1, help=argparse.SUPPRESS)  # testing aids
    b.add_argument("--chunk-images", type=int, default=CHUNK_IMAGES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.short_side < 8:
        raise UserError(f"--short-side {args.short_side}: at least 8 px")
    settings = StoreSettings(args.format, args.split, args.short_side, args.strict, args.skip_bad)
    build(args.data, args.out, settings, args.workers, args.kill_after, args.chunk_images)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    run_cli(main)
