"""DDP for real: ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process with the same
global batch, and a kill -9 of the 2-process run resumed to the uninterrupted run's weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint, model_from_checkpoint
from pretext.train import main, parse_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# Tolerance of the 2-process weights against one process's (docs/pretraining.md, "DDP"): each weight tensor
# within RTOL of its largest magnitude, the eval-mode output on a fixed batch within OUTPUT_ATOL.
# The ranks sum gradients in another order than one process does (4 + 4 samples, then the mean
# over ranks), and Adam turns rounding differences of small gradients into differences of its
# steps. Measured after 8 steps (AMD EPYC): 6.9e-4 and 2.8e-3 -- what the same 1-process run gives
# with threads=2 instead of 1 (6.9e-4, 2.5e-3); with plain per-rank BatchNorm: 1.37 and 0.36.
RTOL = 5e-3
# Conv biases followed by BatchNorm: BN removes them, their gradient is 0 up to rounding, and Adam
# makes steps of ~lr out of that noise, in one process as in two. They (and the running means of
# their BN, which track them) are checked through the network's output instead.
CANCELLED = {f"decoder.layers.{i}.bias" for i in (0, 3, 6)} | {
    f"decoder.layers.{i}.running_mean" for i in (1, 4, 7)
}
OUTPUT_ATOL = 1e-2  # the output is a tanh, in [-1, 1]
# From an image store (test below), measured on the Intel Xeon type: 3.1e-2 and 1.1e-2 after 8 steps
STORE_RTOL, STORE_OUTPUT_ATOL = 0.1, 3e-2


def args(voc, run_dir):
    return [
        f"data.root={voc}",
        f"run_dir={run_dir}",
        "data.num_workers=0",
        "optim.batch_size=8",  # the global batch: 4 per rank
        f"optim.steps={STEPS}",
        "optim.warmup_steps=2",
        "checkpoint_every=3",
        "log_every=1",
        "eval_images=4",
        "threads=1",
        # fp32: the tolerances above are fp32 reduction-order drift; amp=auto is bf16 on a CPU with
        # AMX (docs/precision.md), whose 8-bit mantissa puts the two runs further apart than that
        "amp=off",
    ]


def torchrun(voc, run_dir, extra=()) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m pretext.train``, in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    log = open(Path(run_dir).parent / f"{Path(run_dir).name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [*cmd, "-m", "pretext.train", *args(voc, run_dir), *extra],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, recursively (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def finish(proc: subprocess.Popen, run_dir) -> None:
    rc = proc.wait(timeout=120)
    assert rc == 0, (Path(run_dir).parent / f"{Path(run_dir).name}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tiny_voc, tmp_path_factory):
    """An uninterrupted 2-process run (shared by the tests below)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "two"
    finish(torchrun(tiny_voc, run_dir), run_dir)
    return run_dir


def output_on_fixed_batch(state) -> torch.Tensor:
    model = model_from_checkpoint(state).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, model.input_size, model.input_size, generator=gen) * 2 - 1
    with torch.no_grad():
        return model(x)


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(
    ddp_run, tiny_voc, tmp_path
):
    one = tmp_path / "one"
    main(parse_config(args(tiny_voc, one)))
    a, b = load_checkpoint(one), load_checkpoint(ddp_run)
    assert a["step"] == b["step"] == STEPS
    assert "rng_ranks" in b and len(b["rng_ranks"]) == 2  # the 2-process run saved both ranks'
    worst = {}
    for k, x in a["model"].items():
        y = b["model"][k]
        if not x.is_floating_point():  # num_batches_tracked
            assert torch.equal(x, y), k
            continue
        if k in CANCELLED:
            continue
        worst[k] = float((x - y).abs().max() / x.abs().max().clamp_min(1e-12))
    print("max relative weight difference:", max(worst.values()), max(worst, key=worst.get))
    assert max(worst.values()) < RTOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert len(worst) > 20  # the encoder, bottleneck, decoder weights and BN statistics
    out_a, out_b = output_on_fixed_batch(a), output_on_fixed_batch(b)
    print("max output difference:", float((out_a - out_b).abs().max()))
    assert torch.allclose(out_a, out_b, rtol=0, atol=OUTPUT_ATOL)
    # metrics are logged once (rank 0), with the global batch's loss
    ref = read_jsonl(one / "metrics.jsonl")
    got = read_jsonl(ddp_run / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    # float32 sums in another order (two ranks' shares vs one batch): up to 1.9e-5 relative by
    # step 8 on the Intel Xeon type (AVX-512 kernels), under 1e-5 on the AMD EPYC type
    for r, g in zip(ref, got):
        assert g["loss_rec"] == pytest.approx(r["loss_rec"], rel=5e-5), r["step"]
    assert json.loads((ddp_run / "result.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(ddp_run, tiny_voc, tmp_path):
    run_dir = tmp_path / "killed"
    proc = torchrun(tiny_voc, run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 90
    # kill -9 the whole torchrun group once a checkpoint (step 3) is written and a step after it
    while not any(r["step"] >= 4 for r in read_jsonl(run_dir / "metrics.jsonl")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no step 4 in 90 s"
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: kill -9 the workers, then torchrun
    workers = descendants(proc.pid)
    assert len(workers) >= 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["step"]
    assert killed_at in (3, 6) and not (run_dir / "result.json").exists()

    finish(torchrun(tiny_voc, run_dir), run_dir)
    log = (run_dir.parent / "killed.log").read_text()
    assert log.count(f"from step {killed_at}") == 2  # both ranks, from the same checkpoint
    a, b = load_checkpoint(ddp_run), load_checkpoint(run_dir)
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:  # same processes, same reduction order: bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    ranks = b["rng_ranks"]  # one torch RNG stream (dropout) per rank, both saved
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    ref = {r["step"]: r["loss_rec"] for r in read_jsonl(ddp_run / "metrics.jsonl")}
    got = [(r["step"], r["loss_rec"]) for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # each step logged once
    assert dict(got) == ref


@pytest.mark.slow
def test_two_processes_from_an_image_store_reach_the_weights_of_one(tiny_voc, tmp_path):
    """data.store: each rank cuts its slice of the global batch from the store (the samples of
    one process's batch, pixel for pixel on the CPU), so two processes end where one does."""
    from core.image_store import StoreSettings, build

    store = build(tiny_voc, tmp_path / "store", StoreSettings("voc", "train", 64))
    extra = [f"data.store={store}"]
    one, two = tmp_path / "one", tmp_path / "two"
    main(parse_config([*args(tiny_voc, one), *extra]))
    finish(torchrun(tiny_voc, two, extra), two)
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["step"] == b["step"] == STEPS and a["data_store"] == b["data_store"]
    ref, got = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    # the same samples (pixel for pixel: tests/test_batch_augment.py), so the losses agree up to
    # the reduction-order drift, which Adam amplifies step by step. It depends on the data and the
    # CPU type: on this 48-image set under 5e-5 by step 8 on the AMD EPYC type; on the Intel Xeon
    # type (2026-12-03) 8.6e-8 at step 1, 0 at step 3, then ~4x a step to 1.2e-4 at step 8, with the
    # weights STORE_RTOL-close (3.1e-2) and the output 1.1e-2 apart. A wrong slice or an unsynced
    # BatchNorm differs from the first step (per-rank BN: 1.37 in the weights), hence the tight
    # check on the first steps and the looser one at the end.
    for r, g in zip(ref, got, strict=True):
        rel = 1e-6 if r["step"] <= 3 else 1e-3
        assert g["loss_rec"] == pytest.approx(r["loss_rec"], rel=rel), r["step"]
    out_a, out_b = output_on_fixed_batch(a), output_on_fixed_batch(b)
    assert torch.allclose(out_a, out_b, rtol=0, atol=STORE_OUTPUT_ATOL)
    worst = max(
        float((x - b["model"][k]).abs().max() / x.abs().max().clamp_min(1e-12))
        for k, x in a["model"].items()
        if x.is_floating_point() and k not in CANCELLED
    )
    assert worst < STORE_RTOL


def test_two_process_run_with_the_probe_reaches_the_same_weights(ddp_run, tiny_voc, tmp_path):
    """The probe runs on rank 0 alone (no collective; rank 1 waits in the next all-reduce): no
    deadlock, its lines logged once, and the weights those of the 2-process run without it."""
    run_dir = tmp_path / "probed"
    probe = ["probe.every=4", f"probe.data={tiny_voc}", "probe.max_images=16"]
    finish(torchrun(tiny_voc, run_dir, probe), run_dir)
    a, b = load_checkpoint(ddp_run), load_checkpoint(run_dir)
    for k in a["model"]:  # same processes, same reduction order: bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    lines = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "images_seen" in r]
    assert [(r["step"], r["images_seen"]) for r in lines] == [(0, 0), (4, 32), (8, 64)]
