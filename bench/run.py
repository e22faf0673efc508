"""``make bench``: every benchmark in its own process, then results/bench.json and results/bench.md.

    python -m bench.run                   # the full set (< 10 min on an idle 2-core CPU)
    python -m bench.run --tiny --out-dir /tmp/b --data-root /tmp/minivoc   # seconds: a smoke run

Each process measures one thing next to its reference (our step vs the eager baseline, the data
pipeline vs that step, FAISS vs brute force), so the ratios hold even on a noisy, shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.atomic_io import atomic_write_json, atomic_write_text
from core.machine import cpu_model

# (name, module, args): batch 32 for AlexNet-227 keeps `make bench` under 10 minutes on 2 cores.
FULL = [
    ("step_inpaint128", "bench.step", ["--arch", "inpaint128", "--batch", "64", "--iters", "3", "--pipeline-batches", "8"]),
    ("step_alexnet227", "bench.step", ["--arch", "alexnet227", "--batch", "32", "--iters", "3", "--pipeline-batches", "8"]),
    ("step_small64", "bench.step", ["--arch", "small64", "--batch", "64", "--iters", "5", "--pipeline-batches", "8"]),
    ("retrieval_10k", "bench.retrieval", ["--n", "10000", "--dim", "1024", "--queries", "1000"]),
    ("retrieval_100k", "bench.retrieval", ["--n", "100000", "--dim", "1024", "--queries", "1000"]),
    ("data_path_alexnet227", "bench.data_path", ["--arch", "alexnet227", "--batch", "32", "--batches", "8", "--steps", "2"]),
    ("data_path_small64", "bench.data_path", ["--arch", "small64", "--batch", "32", "--batches", "8", "--steps", "3"]),
    ("stages_small64", "bench.stage_precision", ["--arch", "small64", "--iters", "5"]),
    ("stages_alexnet227", "bench.stage_precision", ["--arch", "alexnet227", "--iters", "3", "--finetune-batch", "16", "--feature-batch", "32"]),
]  # fmt: skip
# `python -m bench.run --device cuda` (a GPU machine): the trainer's GPU defaults (bf16 autocast,
# channels_last) against the eager fp32 baseline, plus torch.compile on the 128-px network, each with
# its data pipeline (workers on that machine's CPU) timed beside it. Written to bench_gpu.json.
GPU = [
    ("gpu_step_inpaint128", "bench.step", ["--arch", "inpaint128", "--batch", "64", "--iters", "20", "--pipeline-batches", "16"]),
    ("gpu_step_inpaint128_compiled", "bench.step", ["--arch", "inpaint128", "--batch", "64", "--iters", "20", "compile=true"]),
    ("gpu_step_alexnet227", "bench.step", ["--arch", "alexnet227", "--batch", "128", "--iters", "20", "--pipeline-batches", "16"]),
    ("gpu_step_small64", "bench.step", ["--arch", "small64", "--batch", "256", "--iters", "20", "--pipeline-batches", "16"]),
    ("gpu_step_small64_14workers", "bench.step", ["--arch", "small64", "--batch", "256", "--iters", "20", "--pipeline-batches", "16", "data.num_workers=14"]),
]  # fmt: skip
TINY = [
    ("step_small64", "bench.step", ["--arch", "small64", "--batch", "4", "--iters", "1", "--pipeline-batches", "1"]),
    ("retrieval_10k", "bench.retrieval", ["--n", "400", "--dim", "16", "--queries", "20"]),
    ("retrieval_100k", "bench.retrieval", ["--n", "1600", "--dim", "16", "--queries", "20"]),
    ("stages_small64", "bench.stage_precision", ["--arch", "small64", "--iters", "1", "--finetune-batch", "2", "--feature-batch", "2"]),
]  # fmt: skip


def run_one(module: str, args: list[str], out: Path, in_process: bool) -> dict:
    if in_process:  # the smoke test: same code, no interpreter start-up
        mod = __import__(module, fromlist=["main"])
        return mod.main(mod.parse_args([*args, "--out", str(out)]))
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "cuda": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None}  # fmt: skip


def scaling(small: dict, large: dict) -> dict:
    """Exponent b of t ~ n^b between the two retrieval sizes, for build and query time."""
    import math

    ratio = math.log(large["n"] / small["n"])
    b = lambda key_small, key_large: math.log(key_large / key_small) / ratio  # noqa: E731
    return {
        "brute_build": b(small["brute"]["build_s"], large["brute"]["build_s"]),
        "brute_query": b(small["brute"]["query_s"], large["brute"]["query_s"]),
        "faiss_build": b(small["faiss"]["build_s"], large["faiss"]["build_s"]),
        "faiss_query_at_chosen_nprobe": b(small["faiss"]["chosen"]["query_s"], large["faiss"]["chosen"]["query_s"]),
    }  # fmt: skip


def _f(x, nd=1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def gpu_markdown(gpu: dict | None) -> list[str]:
    """The GPU section: from bench_gpu.json (``--device cuda`` on a GPU machine) when there is one."""
    if gpu is None:
        return [
            "No GPU run is recorded (`bench_gpu.json`): the GPU paths (bf16 autocast, channels_last, "
            "torch.compile, hole filling and loss weights computed on the device from uint8 images and "
            "bool masks sent with pinned memory by several workers) are in the code (`step_settings`, "
            "`InpaintingStep.__call__`, `make_loader`). `python -m bench.run --device cuda` measures them on a GPU "
            "machine.",
        ]
    env = gpu["environment"]
    lines = [
        f"{env['gpu']}, torch {env['torch']}, host CPU {env['cpu']} ({env['cores']} cores); wall time "
        f"{gpu['wall_s']:.0f} s. Baseline: the eager fp32 NCHW step of section 1. Ours: "
        "`pretext.methods.context_encoder.InpaintingStep` with the trainer's GPU defaults (settings column). Median of 20 "
        "alternating timed steps after one warm-up step (which includes compilation when it is on).",
        "",
        "| network | batch | ours: settings | baseline img/s | ours img/s | speed-up | ours TFLOP/s | "
        "first step s (ours) | peak GPU MiB (baseline / ours) | pipeline img/s (workers) | pipeline / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gpu["runs"].values():
        s, p = r["step"], r.get("pipeline")
        st = s["settings"]
        flags = ", ".join(
            x for x in (st["autocast"], "channels_last" if st["channels_last"] else None,
                        "compile" if st["compile"] else None) if x
        ) or "fp32"  # fmt: skip
        mem = [s[f"{k}_memory"].get("cuda_max_allocated_mb") for k in ("baseline", "ours")]
        pipe = (
            f"{_f(p['images_per_s'])} ({p['workers']}) | **{p['pipeline_over_step']:.2f}x**"
            if p
            else "— | —"
        )
        lines.append(
            f"| {s['arch']} ({s['mask']}{', +adversarial' if s['adversarial'] else ''}) | {s['batch']} | "
            f"{flags} | {_f(s['baseline_images_per_s'])} | {_f(s['ours_images_per_s'])} | "
            f"**{s['speedup']:.2f}x** | {s['ours_gflops'] / 1000:.1f} | {s['ours_first_step_s']:.1f} | "
            f"{_f(mem[0], 0)} / {_f(mem[1], 0)} | {pipe} |"
        )
    return lines


def data_path_markdown(res: dict) -> list[str]:
    """Section 4, from the data_path_* runs (``python -m bench.run --only data_path_alexnet227
    data_path_small64`` re-measures just these, with their own environment line)."""
    runs = {k: r for k, r in res["runs"].items() if k.startswith("data_path_")}
    if not runs:
        return []
    lines = [
        "",
        "## 4. Data path: per-image loader vs image store + batched crops and masks, same process",
        "",
        "| input | mask | batch | workers | loader img/s | store + batched img/s | speed-up | "
        "peak RSS MiB (loader / batched, main + workers) | end to end with the step img/s (loader / batched) | "
        "store build s (images, MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def where(r: dict) -> str:  # rows of several machines and commits side by side
        e = r.get("environment")
        return f"; {e['cpu']}, {e['commit']}" if e else ""

    for r in runs.values():
        e2e = r.get("end_to_end")
        e2e_s = (f"{_f(e2e['loader_images_per_s'])} / {_f(e2e['batched_images_per_s'])}"
                 if e2e else "—")  # fmt: skip
        st = r["store"]
        lines.append(
            f"| {r['size']} px ({r['arch']}{where(r)}) | {r['mask']} | {r['batch']} | {r['workers']} | "
            f"{_f(r['loader']['images_per_s'])} | {_f(r['batched']['images_per_s'])} | "
            f"**{r['speedup']:.2f}x** | {r['loader_peak_rss_mb']:.0f} / {r['batched_peak_rss_mb']:.0f} | "
            f"{e2e_s} | {st['build_s']:.1f} ({st['images']}, {st['mib']:.0f}) |"
        )
    for r in runs.values():
        e = r.get("environment")
        if e:
            lines += ["", f"{r['arch']}{where(r)}: measured {e['date']}, commit {e['commit']}, {e['cpu']} "
                      f"({e['cores']} cores), load average before/after {e['load_before']} / "
                      f"{e['load_after']}."]  # fmt: skip
    runs_e2e = {k: r for k, r in res["runs"].items() if k.startswith("store_run")}
    if runs_e2e:
        lines += ["", "The built-in profile's pretext run (`python -m bench.store_run`: small64, batch 32, "
                  "`data.num_workers=0`, `channels_last=on`; steps x alternating rounds), images/s of "
                  "data + step from the trainer's metrics lines:", "",
                  "| machine, commit | overrides | steps x rounds | per-image img/s | `data.store` img/s | "
                  "speed-up | load average before / after |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in runs_e2e.values():
            e = r["environment"]
            lines.append(
                f"| {e['cpu']}, {e['commit']} | {' '.join(r['overrides']) or '—'} | "
                f"{r['steps']} x {r['rounds']} | {_f(r['per_image']['images_per_s'])} | "
                f"{_f(r['store']['images_per_s'])} | **{r['speedup']:.2f}x** | "
                f"{e['load_before']} / {e['load_after']} |"
            )
    lines += [
        "",
        "Loader: today's `MaskedImages(VOCImages)` DataLoader (JPEG decode, PIL crop + flip, numpy "
        "mask per image). Store + batched: `core.batched_source` over a `core.image_store` store of "
        "the same split (short side = input size), whole batches made in the same number of loader "
        "processes of one torch thread each: up to commit 6b63fba with the batched tensor ops on the "
        "CPU too (crops by `grid_sample`, masks by ragged gathers over a silhouette bank), from "
        "commit ece0f73 on the CPU per sample from the same draws (PIL's resize of the drawn box, "
        "`core.masks`' hole; the batched ops stay the GPU's). Images/s: median of 3 alternating "
        "rounds of 8 batches after the first.",
    ]
    return lines


def bf16_markdown(runs: dict) -> list[str]:
    """Our step in bf16 autocast beside fp32 (bench.step, same process), on a CPU with bf16
    matrix units; nothing where no step recorded it."""
    steps = [
        r["step"] for n, r in runs.items() if n.startswith("step_") and "bf16_speedup" in r["step"]
    ]
    if not steps:
        return []
    lines = [
        "",
        f"bf16 autocast beside fp32, our step in the same alternation ({steps[0]['cpu_bf16']}; "
        f"the trainer's amp=auto, so 'ours' above, is {steps[0]['settings']['autocast'] or 'fp32'} "
        "here: core.machine.resolve_amp, docs/precision.md):",
        "",
        "| network | batch | fp32 img/s | bf16 img/s | bf16 / fp32 | fraction of bf16 matmul | bf16 matmul GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for s in steps:
        lines.append(
            f"| {s['arch']} | {s['batch']} | {_f(s['fp32_images_per_s'])} | "
            f"{_f(s['bf16_images_per_s'])} | **{s['bf16_speedup']:.2f}x** | "
            f"{s['bf16_fraction_of_bf16_matmul']:.2f} | {_f(s['bf16_matmul_gflops'])} |"
        )
    return lines


def stages_markdown(runs: dict) -> list[str]:
    """The stages after pretext in bf16 beside fp32 (bench.stage_precision), where recorded."""
    stages = [r for n, r in runs.items() if n.startswith("stages_")]
    if not stages:
        return []
    lines = [
        "",
        "## 5. The stages after pretext: bf16 autocast beside fp32, same process",
        "",
        f"{stages[0]['cpu_bf16']}. Fine-tuning: one `transfer.classify.train_step` (encoder + mlp "
        "head, Adam); features: `core.features.batch_features`, conv1..conv5 + bottleneck (the "
        "frozen protocols' and retrieval's extraction). Median of alternating timed calls.",
        "",
        "| network | stage | batch | fp32 img/s | bf16 img/s | bf16 / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in stages:
        e = r.get("environment")
        where = (
            f"; {e['cpu']}, {e['commit']}, load {e['load_before']} / {e['load_after']}" if e else ""
        )
        for stage in ("finetune", "features"):
            row = r[stage]
            speedup = f"**{row['bf16_speedup']:.2f}x**" if "bf16_speedup" in row else "not timed"
            lines.append(
                f"| {r['arch']} ({r['threads']} threads{where}) | {stage} | {row['batch']} | "
                f"{_f(row['fp32_images_per_s'])} | "
                f"{_f(row.get('bf16_images_per_s'))} | {speedup} |"
            )
    return lines


def markdown(res: dict, gpu: dict | None = None) -> str:
    env = res["environment"]
    lines = [
        "# `make bench`",
        "",
        f"torch {env['torch']}, {env['cores']} CPU cores ({env['torch_threads']} torch threads), "
        f"CUDA: {env['cuda']}. Load average before/after: {res['load_before']} / {res['load_after']} "
        f"(other jobs share this machine: absolute rates are noisy, the ratios are measured side by "
        f"side in one process). Wall time {res['wall_s']:.0f} s.",
        "",
        "## 1. Pretext training step (images/s, median of alternating timed steps)",
        "",
        "| network | batch | baseline img/s | ours img/s | speed-up | GFLOP/img | ours GFLOP/s | "
        "fraction of fp32 matmul (baseline / ours) | matmul GFLOP/s | peak RSS MiB (baseline / ours) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        if not name.startswith("step_"):
            continue
        s = r["step"]
        lines.append(
            f"| {s['arch']} ({s['mask']}{', +adversarial' if s['adversarial'] else ''}) | {s['batch']} | "
            f"{_f(s['baseline_images_per_s'])} | {_f(s['ours_images_per_s'])} | **{s['speedup']:.2f}x** | "
            f"{s['gflop_per_image']:.2f} | {_f(s['ours_gflops'])} | "
            f"{_f(s.get('baseline_fraction_of_matmul'), 2)} / {_f(s.get('ours_fraction_of_matmul'), 2)} | "
            f"{_f(s['matmul_gflops'])} | {s['baseline_memory']['peak_rss_mb']:.0f} / "
            f"{s['ours_memory']['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Baseline: `bench/baseline.py`, the same networks and losses written plainly (eager fp32, NCHW, "
        "out-of-place activations, per-parameter Adam). Ours: `pretext.methods.context_encoder.InpaintingStep` with the trainer's "
        "CPU defaults (settings in bench.json). FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one "
        "step (convolutions and matmuls, forward and backward). Peak RSS: the process high-water mark "
        "(VmHWM, reset through /proc/self/clear_refs) during one step, both models resident.",
        *bf16_markdown(res["runs"]),
        "",
        "## 2. Data pipeline alone (decode, crop, mask, batch) vs the training step, same process",
        "",
        "| input | mask | workers | pipeline img/s | step img/s | pipeline / step | peak RSS MiB (main + workers) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"].values():
        if "pipeline" not in r:
            continue
        p, s = r["pipeline"], r["step"]
        lines.append(
            f"| {p['size']} px ({s['arch']}) | {p['mask']} | {p['workers']} | {_f(p['images_per_s'])} | "
            f"{_f(s['ours_images_per_s'])} | **{p['pipeline_over_step']:.1f}x** | "
            f"{p['memory']['peak_rss_mb']:.0f} + {p['memory']['workers_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "## 3. Retrieval: FAISS IVF-Flat vs exact brute force (scikit-learn NearestNeighbors)",
        "",
        "| n | dim | brute q/s | FAISS index | nprobe | FAISS q/s | speed-up | recall@10 | build s (brute / FAISS) | peak RSS MiB (brute / FAISS) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in res["runs"].items():
        if not name.startswith("retrieval_"):
            continue
        c = r["faiss"]["chosen"]
        lines.append(
            f"| {r['n']} | {r['dim']} | {_f(r['brute']['queries_per_s'])} | {r['faiss']['index']} | "
            f"{c['nprobe']} | {_f(c['queries_per_s'])} | **{r['speedup']:.1f}x** | {c['recall_at_k']:.3f} | "
            f"{r['brute']['build_s']:.2f} / {r['faiss']['build_s']:.2f} | "
            f"{r['brute']['memory']['peak_rss_mb']:.0f} / {r['faiss']['memory']['peak_rss_mb']:.0f} |"
        )
    if "retrieval_scaling" in res:
        sc = res["retrieval_scaling"]
        lines += ["", f"Growth with n (exponent b in time ~ n^b, n = {res['runs']['retrieval_10k']['n']} -> {res['runs']['retrieval_100k']['n']}): " + ", ".join(
            f"{k} {v:.2f}" for k, v in sc.items()) + "."]  # fmt: skip
    lines += data_path_markdown(res)
    lines += stages_markdown(res["runs"])
    lines += [
        "",
        "## GPU",
        "",
        *gpu_markdown(gpu),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, in-process (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument(
        "--data-root", default="data/minivoc", help="mini-VOC folder (generated if missing)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these entries of the CPU plan and merge them into the existing bench.json",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the GPU plan, into bench_gpu.json; bench.md is re-rendered from both JSON files",
    )
    return parser.parse_args(argv)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(args: argparse.Namespace) -> dict:
    gpu = args.device == "cuda"
    plan = GPU if gpu else TINY if args.tiny else FULL
    if args.only:
        unknown = set(args.only) - {name for name, _, _ in plan}
        if unknown:
            raise SystemExit(
                f"error: --only: unknown {sorted(unknown)}; choose from {[n for n, _, _ in plan]}"
            )
        plan = [entry for entry in plan if entry[0] in args.only]
    start, load_before = time.perf_counter(), _load()
    runs: dict = {}
    failed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module, margs in plan:
            if module == "bench.step":
                margs = [*margs, "--data-root", args.data_root, "--device", args.device]
            if module == "bench.data_path":
                margs = [*margs, "--data-root", args.data_root]
            load_one = _load()
            print(f"[bench] {name}", flush=True)
            try:
                runs[name] = run_one(module, margs, Path(tmp) / f"{name}.json", args.tiny)
                if module in (
                    "bench.data_path",
                    "bench.stage_precision",
                ):  # own provenance (--only)
                    runs[name]["environment"] = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(),
                        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                        "load_before": load_one, "load_after": _load()}  # fmt: skip
            except (subprocess.CalledProcessError, OSError) as err:  # keep the other figures
                print(f"[bench] {name} failed: {err}", file=sys.stderr, flush=True)
                failed[name] = str(err)
    res = {"environment": environment(), "load_before": load_before, "load_after": _load(),
           "wall_s": time.perf_counter() - start, "runs": runs, "failed": failed}  # fmt: skip
    previous = _read_json(args.out_dir / ("bench_gpu.json" if gpu else "bench.json"))
    if args.only and previous is not None:  # keep every other figure and its environment
        res = {**previous, "runs": {**previous["runs"], **runs}}
    if "retrieval_10k" in runs and "retrieval_100k" in runs:
        res["retrieval_scaling"] = scaling(runs["retrieval_10k"], runs["retrieval_100k"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / ("bench_gpu.json" if gpu else "bench.json"), res)
    cpu_res = _read_json(args.out_dir / "bench.json")
    if cpu_res is not None:  # a GPU run alone leaves bench.md to the CPU run that writes it
        gpu_res = _read_json(args.out_dir / "bench_gpu.json")
        atomic_write_text(args.out_dir / "bench.md", markdown(cpu_res, gpu_res))
    return res


if __name__ == "__main__":
    main(parse_args())
