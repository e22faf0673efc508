"""Benchmark: bf16 autocast against fp32 in the stages after pretext, in one process.

    python -m bench.stage_precision --arch small64 --out stages_small64.json

Each stage's own code at the built-in settings, both precisions timed in alternation (fp32, bf16,
fp32, ...) on the same weights and batch, so that load from other processes hits both alike:

- ``finetune``: one fine-tuning step of ``transfer.classify`` (:func:`transfer.classify.train_step`:
  encoder + mlp head, Adam, the VOC multi-label loss), batch 32 as its default;
- ``features``: the frozen protocols' and retrieval's feature extraction
  (:func:`core.features.batch_features`: conv1..conv5 + bottleneck, pooled), batch 64 as theirs.

The detection and segmentation transfers are not here: mmengine's ``AmpOptimWrapper`` refuses a
CPU, and with a CPU autocast wrapper mmcv's CPU kernels (nms, RoIAlign) take fp32 only
(docs/precision.md). On a CPU without bf16 units bf16 is emulated; the result says so and times
fp32 alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.machine import matmul_gflops
from core.atomic_io import atomic_write_json
from core.classifier import Classifier
from core.features import LAYERS, batch_features, pooling_for
from core.machine import cpu_bf16
from core.models import build_model
from transfer.classify import FinetuneConfig, make_optimizer, train_step


def time_alternating(
    steps: dict[str, Callable[[], None]], iters: int, batch: int
) -> dict[str, float]:
    """{name: images/s}, median over ``iters`` alternating calls of each step after one warm-up."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: batch / statistics.median(ts) for name, ts in times.items()}


def finetune_steps(arch: str, batch: int, dtypes: dict[str, torch.dtype | None]) -> dict:
    """One :func:`transfer.classify.train_step` per precision, each on its own copy of the same
    weights (so neither trains the other's model), same batch."""
    fc = FinetuneConfig()
    torch.manual_seed(0)
    model = build_model(arch)
    size = model.input_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = (torch.rand(batch, 20) < 0.15).float()
    diff = torch.zeros(batch, 20)
    steps = {}
    for name, dtype in dtypes.items():
        torch.manual_seed(0)
        net = Classifier(build_model(arch).encoder, 20, fc.head, fc.hidden, fc.dropout)
        net.train()
        opt = make_optimizer(net, fc)
        steps[name] = lambda net=net, opt=opt, dtype=dtype: train_step(
            net, (images, labels, diff), opt, fc, dtype
        )
    return steps


def feature_steps(arch: str, batch: int, dtypes: dict[str, torch.dtype | None]) -> dict:
    """:func:`core.features.batch_features` of every layer, one model, per precision."""
    torch.manual_seed(0)
    model = build_model(arch).eval()
    pooling = pooling_for(model)
    size = model.input_size
    x = torch.rand(batch, 3, size, size) * 2 - 1

    @torch.no_grad()
    def extract(dtype: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            feats = batch_features(model, x, LAYERS, pooling)
        [f.float() for f in feats.values()]  # what layer_features keeps: float32

    return {name: (lambda dtype=dtype: extract(dtype)) for name, dtype in dtypes.items()}


def measure(arch: str, iters: int, finetune_batch: int = 32, feature_batch: int = 64) -> dict:
    units, why = cpu_bf16()
    dtypes = {"fp32": None, "bf16": torch.bfloat16} if units else {"fp32": None}
    out: dict = {"arch": arch, "iters": iters, "threads": torch.get_num_threads(),
                 "cpu_bf16": why, "bf16_timed": units}  # fmt: skip
    for stage, make, batch in (
        ("finetune", finetune_steps, finetune_batch),
        ("features", feature_steps, feature_batch),
    ):
        rates = time_alternating(make(arch, batch, dtypes), iters, batch)
        row = {"batch": batch, **{f"{k}_images_per_s": v for k, v in rates.items()}}
        if units:
            row["bf16_speedup"] = rates["bf16"] / rates["fp32"]
        out[stage] = row
    out["matmul_gflops"] = matmul_gflops()
    if units:
        out["bf16_matmul_gflops"] = matmul_gflops(dtype=torch.bfloat16)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="small64", choices=("small64", "alexnet227"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--finetune-batch", type=int, default=32)
    parser.add_argument("--feature-batch", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    result = measure(args.arch, args.iters, args.finetune_batch, args.feature_batch)
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(parse_args())
