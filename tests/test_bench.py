"""`make bench` code on tiny sizes: the JSON it writes, and that the eager baseline and our trainer's
step compute the same losses from the same weights and batch (not a timed test)."""

import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a top-level folder run with `python -m bench.run` from the repository root, not an
# installed package (until pyproject's packages include it): make it importable here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import run, step  # noqa: E402
from bench.retrieval import clustered_features, recall_at_k  # noqa: E402


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("small64", []), ("inpaint128", []), ("alexnet227", ["model.dropout=0.0"])],
)
def test_baseline_and_our_step_compute_the_same_losses(arch, overrides):
    torch.manual_seed(0)
    # amp=off: the baseline is fp32, and amp=auto is bf16 on a CPU with AMX (docs/precision.md)
    cfg = step.bench_config(arch, 2, ["device=cpu", "amp=off", *overrides])
    images, hole = step.make_batch(cfg, 2)
    mean = [0.1, -0.2, 0.05]
    ours = step.build_ours(cfg, torch.device("cpu"), mean)
    base = step.build_baseline(cfg, ours, mean)
    # Step 1 from the same weights: the same losses to fp32 rounding. Step 2 checks that both
    # optimizers updated alike; Adam's g / sqrt(v) amplifies rounding of near-zero gradients (in
    # fp32 on 2 images), hence the looser tolerance there.
    for rel in (1e-5, 1e-3):
        a, b = base(images, hole), ours(images, hole)
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rel), k
    if cfg.loss.adversarial:
        assert {"loss_adv", "loss_disc"} <= a.keys()


def test_recall_oracle_and_features_are_unit_norm():
    exact = [[1, 2, 3], [4, 5, 6]]
    assert recall_at_k(
        torch.tensor([[3, 2, 9], [4, 5, 6]]).numpy(), torch.tensor(exact).numpy()
    ) == pytest.approx((2 / 3 + 1) / 2)
    x = clustered_features(50, 8)
    assert x.shape == (50, 8) and (x >= 0).all()
    assert torch.allclose(torch.from_numpy(x).norm(dim=1), torch.ones(50), atol=1e-5)


@pytest.mark.slow
def test_tiny_bench_writes_json_and_markdown(tmp_path):
    # its own data root: the bench generates the default mini-VOC there, which under the session's
    # tiny_voc folder would replace that shared fixture for every later test
    data_root = tmp_path / "minivoc"
    res = run.main(
        run.parse_args(["--tiny", "--out-dir", str(tmp_path), "--data-root", str(data_root)])
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert (
        saved["runs"].keys()
        == res["runs"].keys()
        == {"step_small64", "retrieval_10k", "retrieval_100k", "stages_small64"}
    )
    s = saved["runs"]["step_small64"]["step"]
    for key in ("baseline_images_per_s", "ours_images_per_s", "gflop_per_image", "matmul_gflops"):
        assert s[key] > 0, key
    assert s["speedup"] == pytest.approx(s["ours_images_per_s"] / s["baseline_images_per_s"])
    # ours in fp32 (or, where amp=auto is bf16 here, its fp32 twin) matches the fp32 baseline
    fp32 = "ours" if s["settings"]["autocast"] is None else "ours_fp32"
    assert s[f"first_loss_{fp32}"]["loss"] == pytest.approx(
        s["first_loss_baseline"]["loss"], rel=1e-5
    )
    assert s["ours_memory"]["peak_rss_mb"] > 0
    p = saved["runs"]["step_small64"]["pipeline"]
    assert p["images_per_s"] > 0 and p["pipeline_over_step"] == pytest.approx(
        p["images_per_s"] / s["ours_images_per_s"]
    )
    for name in ("retrieval_10k", "retrieval_100k"):
        r = saved["runs"][name]
        assert 0 <= r["recall_at_k"] <= 1 and r["speedup"] > 0
        assert r["faiss"]["chosen"] in r["faiss"]["sweep"]
    assert set(saved["retrieval_scaling"]) >= {"brute_query", "faiss_build"}
    st = saved["runs"]["stages_small64"]
    for stage in ("finetune", "features"):
        assert st[stage]["fp32_images_per_s"] > 0
        if st["bf16_timed"]:  # a CPU with bf16 units: both precisions, side by side
            ratio = st[stage]["bf16_images_per_s"] / st[stage]["fp32_images_per_s"]
            assert st[stage]["bf16_speedup"] == pytest.approx(ratio)
    md = (tmp_path / "bench.md").read_text()
    assert "speed-up" in md and "small64" in md and "recall@10" in md
    assert "## 5. The stages after pretext" in md


def _fake_step(arch: str, compiled: bool) -> dict:
    mem = {"peak_rss_mb": 900.0, "cuda_max_allocated_mb": 1234.0}
    settings = {"channels_last": True, "autocast": "bfloat16", "compile": compiled, "threads": 16}
    return {"arch": arch, "batch": 64, "mask": "central", "adversarial": True, "settings": settings,
            "baseline_images_per_s": 1000.0, "ours_images_per_s": 2500.0, "speedup": 2.5,
            "ours_gflops": 9830.0, "ours_first_step_s": 31.5,
            "baseline_memory": mem, "ours_memory": dict(mem, cuda_max_allocated_mb=617.0)}  # fmt: skip


def test_gpu_section_renders_the_recorded_gpu_runs():
    gpu = {
        "environment": {"gpu": "NVIDIA H100", "torch": "2.11.0", "cpu": "Xeon", "cores": 16},
        "wall_s": 120.0,
        "runs": {
            "gpu_step_inpaint128": {
                "step": _fake_step("inpaint128", False),
                "pipeline": {"images_per_s": 5000.0, "workers": 2, "pipeline_over_step": 2.0},
            },
            "gpu_step_inpaint128_compiled": {"step": _fake_step("inpaint128", True)},
        },
    }
    lines = run.gpu_markdown(gpu)
    rows = [line for line in lines if line.startswith("| inpaint128")]
    assert len(rows) == 2
    assert "bfloat16, channels_last |" in rows[0] and "**2.50x**" in rows[0]
    assert "| 9.8 | 31.5 | 1234 / 617 | 5000.0 (2) | **2.00x** |" in rows[0]
    assert "bfloat16, channels_last, compile |" in rows[1] and rows[1].endswith("| — | — |")
    assert "NVIDIA H100" in lines[0]
    assert "No GPU run is recorded" in run.gpu_markdown(None)[0]


@pytest.mark.parametrize(
    ("flags", "ours", "other"),
    [
        ({"amx_bf16", "avx512_bf16"}, "bf16", "fp32"),  # matrix units: amp=auto is bf16 (pretext)
        ({"avx512_bf16"}, "fp32", "bf16"),  # vector units only: auto stays fp32, bf16 timed beside
        (set(), "fp32", None),  # no native bf16: nothing timed beside
    ],
)
def test_step_times_the_other_precision_beside_ours_where_the_cpu_has_bf16(
    monkeypatch, flags, ours, other
):
    from bench import machine as bench_machine
    from core import machine

    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(machine, "CPU_BF16_STAGES", frozenset({"pretext"}))
    monkeypatch.setattr(
        step,
        "matmul_gflops",
        lambda dtype=torch.float32: bench_machine.matmul_gflops(128, 0.05, dtype),
    )
    s = step.measure_step("small64", 2, 1, "cpu")
    assert s["settings"]["autocast"] == {"fp32": None, "bf16": "bfloat16"}[ours]
    assert s["cpu_bf16"] == machine.cpu_bf16(flags)[1]
    bf16_keys = {"bf16_speedup", "bf16_fraction_of_bf16_matmul", "bf16_images_per_s"}
    if other is None:
        assert not bf16_keys & s.keys() and "ours_bf16_images_per_s" not in s
        return
    bf16, fp32 = ("ours", "ours_fp32") if ours == "bf16" else ("ours_bf16", "ours")
    assert s["fp32_images_per_s"] == s[f"{fp32}_images_per_s"] > 0
    assert s["bf16_images_per_s"] == s[f"{bf16}_images_per_s"] > 0
    assert s["bf16_speedup"] == pytest.approx(s["bf16_images_per_s"] / s["fp32_images_per_s"])
    assert s["bf16_fraction_of_bf16_matmul"] == pytest.approx(
        s[f"{bf16}_gflops"] / s["bf16_matmul_gflops"]
    )
    # the same weights and batch: the first losses agree to bf16 rounding
    loss, loss_bf16 = s[f"first_loss_{fp32}"]["loss"], s[f"first_loss_{bf16}"]["loss"]
    assert loss_bf16 == pytest.approx(loss, rel=3e-2) and loss_bf16 != loss


def test_bf16_rows_render_only_the_steps_that_timed_bf16():
    timed = {"arch": "small64", "batch": 32, "cpu_bf16": "the CPU has bf16 matrix units (x)",
             "fp32_images_per_s": 100.0, "bf16_images_per_s": 150.0, "bf16_speedup": 1.5,
             "bf16_fraction_of_bf16_matmul": 0.25, "bf16_matmul_gflops": 200.0,
             "settings": {"autocast": "bfloat16"}}  # fmt: skip
    runs = {"step_small64": {"step": timed}, "step_inpaint128": {"step": {"arch": "inpaint128"}},
            "retrieval_10k": {}}  # fmt: skip
    lines = run.bf16_markdown(runs)
    rows = [line for line in lines if line.startswith("| small64")]
    assert rows == ["| small64 | 32 | 100.0 | 150.0 | **1.50x** | 0.25 | 200.0 |"]
    assert not any(line.startswith("| inpaint128") for line in lines)
    assert "bf16 matrix units (x)" in "\n".join(lines)
    assert "amp=auto, so 'ours' above, is bfloat16 here" in "\n".join(lines)
    assert run.bf16_markdown({"step_inpaint128": {"step": {"arch": "inpaint128"}}}) == []


@pytest.mark.parametrize("units", [True, False])
def test_stage_precision_times_bf16_only_where_the_cpu_has_units(monkeypatch, units):
    from bench import stage_precision

    why = "the CPU has bf16 matrix units (x)" if units else "the CPU has no bf16 matrix units"
    monkeypatch.setattr(stage_precision, "cpu_bf16", lambda: (units, why))
    monkeypatch.setattr(stage_precision, "matmul_gflops", lambda dtype=None: 1.0)
    out = stage_precision.measure("small64", iters=1, finetune_batch=2, feature_batch=2)
    assert out["bf16_timed"] is units and out["cpu_bf16"] == why
    for stage in ("finetune", "features"):
        assert out[stage]["fp32_images_per_s"] > 0
        assert ("bf16_images_per_s" in out[stage]) is units
        assert ("bf16_speedup" in out[stage]) is units
    assert ("bf16_matmul_gflops" in out) is units
