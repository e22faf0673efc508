"""The built-in profile's pretext run with and without ``data.store``, side by side in one process.

    python -m bench.store_run --steps 60 --rounds 2 --out store_run.json

Both are ``pretext.train.main`` on the built-in profile (``pretext/configs/builtin.yaml`` with the
overrides of ``orchestrate/profiles/builtin.yaml``: ``data.num_workers=0``, ``channels_last=on``),
``--steps`` steps each, alternating (per-image, store, per-image, ...) so load from other
processes hits both alike. Images/s: the trainer's own ``images_per_s`` of every metrics line but
the first (data + step, wall clock between log lines), median over lines and rounds. The store is
built first (its build time is reported: a one-off cost).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from core.atomic_io import atomic_write_json, read_jsonl
from core.image_store import ImageStore, StoreSettings, build
from pretext.train import main as train
from pretext.train import parse_config

PROFILE = ["--config", "pretext/configs/builtin.yaml", "data.num_workers=0", "channels_last=on"]


def rates(run_dir: Path) -> list[float]:
    return [r["images_per_s"] for r in read_jsonl(run_dir / "metrics.jsonl")[1:]]


def compare(steps: int, rounds: int, root: str, overrides=()) -> dict:
    base = [*PROFILE, f"data.root={root}", f"optim.steps={steps}", "log_every=10",
            "eval_images=16", f"checkpoint_every={steps}", *overrides]  # fmt: skip
    out: dict = {"steps": steps, "rounds": rounds, "overrides": list(overrides),
                 "batch": parse_config(base).optim.batch_size}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store64"
        t0 = time.perf_counter()
        build(root, store, StoreSettings("voc", "train", 64))
        out["store_build"] = {"s": time.perf_counter() - t0, "images": len(ImageStore(store))}
        seen: dict[str, list[float]] = {"per_image": [], "store": []}
        for r in range(rounds):
            for name, extra in (("per_image", []), ("store", [f"data.store={store}"])):
                run_dir = Path(tmp) / f"{name}{r}"
                train(parse_config([*base, f"run_dir={run_dir}", *extra]))
                seen[name] += rates(run_dir)
        for name, values in seen.items():
            out[name] = {"images_per_s": statistics.median(values), "lines": values}
    out["speedup"] = out["store"]["images_per_s"] / out["per_image"]["images_per_s"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-root", default="data/minivoc_pretrain/VOC2007")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="more trainer key=value overrides (threads=1)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    res = compare(args.steps, args.rounds, args.data_root, args.overrides)
    atomic_write_json(args.out, res)
    return res


if __name__ == "__main__":
    main(parse_args())
