"""Transfer sweep: tasks x pretext checkpoints x seeds in one process, then mean ± std as JSON.

    python -m transfer.sweep run_dir=runs/transfer_sweep \
        checkpoints.context_encoder=runs/dev/ce checkpoints.autoencoder=runs/dev/ae \
        checkpoints.random_init=runs/dev/rand seeds=[0,1,2]

Each run is an ordinary run folder ``<run_dir>/<task>/<name>/seed<k>`` (finished ones are reused);
``<run_dir>/summary.json`` holds {task: {name: {metric: {mean, std, n, values}}}} and the seconds
per run of each task. Extra per-task overrides: ``classify=[finetune.epochs=10]`` etc.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic_io import atomic_write_json
from core.cli import run_cli
from core.config import load_config

log = logging.getLogger("transfer.sweep")
HEADLINE = {"classify": "mAP", "detect": "mAP", "segment": "mIoU"}


@dataclass
class Config:
    run_dir: str = "runs/transfer_sweep"
    data: str = "data/minivoc/VOC2007"
    checkpoints: dict[str, str] = field(default_factory=dict)  # name -> pretext checkpoint
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ("classify", "detect", "segment")
    classify: tuple[str, ...] = ()  # extra key=value overrides per task
    detect: tuple[str, ...] = ()
    segment: tuple[str, ...] = ()
    threads: int = 0


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML overrides of Config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    return load_config(Config, args.config, args.overrides)


def summarise(results: dict[str, dict[str, list[dict[str, float]]]]) -> dict:
    out: dict = {}
    for task, by_name in results.items():
        for name, runs in by_name.items():
            per_class = ("AP_", "IoU_")  # per-class AP / IoU: summarised by the headline only
            keys = [k for k in runs[0] if not any(p in k for p in per_class)] if runs else []
            out.setdefault(task, {})[name] = {
                k: {
                    "mean": statistics.fmean(r[k] for r in runs),
                    "std": statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0,
                    "n": len(runs),
                    "values": [r[k] for r in runs],
                }
                for k in keys
            }
    return out


def main(cfg: Config) -> dict[str, float]:
    root = Path(cfg.run_dir)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    seconds: dict[str, list[float]] = {}
    flat: dict[str, float] = {}
    for seed in cfg.seeds:  # seed-major: a partial sweep is balanced
        for task in cfg.tasks:
            module = importlib.import_module(f"transfer.{task}")
            for name, ckpt in cfg.checkpoints.items():
                run_dir = root / task / name / f"seed{seed}"
                argv = [f"--checkpoint={ckpt}", f"--data={cfg.data}", f"run_dir={run_dir}",
                        f"seed={seed}", f"threads={cfg.threads}", *getattr(cfg, task)]  # fmt: skip
                t0 = time.perf_counter()
                result = module.main(module.parse_config(argv))
                seconds.setdefault(task, []).append(result.get("time_s", time.perf_counter() - t0))
                results.setdefault(task, {}).setdefault(name, []).append(result)
                summary = summarise(results)
                summary["seconds_per_run"] = {t: statistics.fmean(s) for t, s in seconds.items()}
                atomic_write_json(root / "summary.json", summary)
                log.info(
                    "%s %s seed %d: %s = %.4f",
                    task,
                    name,
                    seed,
                    HEADLINE[task],
                    result[HEADLINE[task]],
                )
    for task, by_name in summarise(results).items():
        for name, stats in by_name.items():
            flat[f"{task}_{name}_{HEADLINE[task]}"] = stats[HEADLINE[task]]["mean"]
    return flat


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_cli(lambda: main(parse_config()))
