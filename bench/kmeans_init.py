"""Benchmark: the Krähenbühl et al. k-means init (core/kmeans_init.py) of an encoder, wall time per
phase, and whether a rerun gives bit-identical weights, on images of the built-in pretraining set.

    python -m bench.kmeans_init --arch small64 --images 160 --threads 1 --out kmeans_init.json

Images: the first ``--images`` of the split, eval view (resize + centre crop), to_unit_range, as
the encoder sees them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import torch

from core.atomic_io import atomic_write_json
from core.data import to_unit_range
from core.datasets import VOCImages
from core.kmeans_init import KMeansInitConfig, kmeans_init_
from core.machine import cpu_model
from core.models import build_model


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="small64")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-patches", type=int, default=KMeansInitConfig.max_patches)
    parser.add_argument("--root", default="data/minivoc_pretrain/VOC2007")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=2, help="runs compared bit for bit")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = build_model(args.arch)
    data = VOCImages(args.root, args.split, model.input_size, train=False)
    images = to_unit_range(torch.stack([data[i] for i in range(min(args.images, len(data)))]))
    cfg = KMeansInitConfig(max_patches=args.max_patches)
    runs = []
    for _ in range(args.repeats):
        encoder = build_model(args.arch).encoder
        t0, c0 = time.perf_counter(), time.process_time()
        report = kmeans_init_(encoder, images, seed=args.seed, cfg=cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.append({"wall_s": wall, "cpu_s": cpu, "sha256": weights_sha256(encoder)})
    result = {
        "arch": args.arch,
        "images": len(images),
        "threads": args.threads,
        "cpu": cpu_model(),
        "config": report["config"],
        "wall_s": [r["wall_s"] for r in runs],
        "cpu_s": [r["cpu_s"] for r in runs],  # less sensitive than wall time to a shared machine
        "load_avg": list(os.getloadavg()),
        "bit_identical": len({r["sha256"] for r in runs}) == 1,
        "sha256": runs[0]["sha256"],
        "layers": report["layers"],
        "between_layer": report["between_layer"],
    }
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(parse_args())
