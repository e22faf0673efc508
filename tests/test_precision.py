"""The precision a step runs in (core.machine.resolve_amp): the rule on injected CPU flags and
devices, the gate of CPU-validated stages, its record in a pretext run folder and the refusal to
resume a run under another precision (docs/precision.md)."""

import json
from dataclasses import dataclass

import pytest
import torch

from core import machine, run_folder
from core.machine import cpu_bf16, precision_name, resolve_amp
from pretext.methods.base import step_settings
from pretext.train import Config, cli, main, parse_config, resolve

AMX = {"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}  # the Intel Xeon type here
AVX512_BF16 = {"fpu", "avx512f", "avx512_bf16"}  # the AMD EPYC (Zen 4) type here
NEITHER = {"fpu", "avx2", "avx512f"}
CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("flags", "units", "named"),
    [(AMX, True, "amx_bf16 avx512_bf16"), (AVX512_BF16, True, "avx512_bf16"), (NEITHER, False, "")],
)
def test_cpu_bf16_reads_the_flags(flags, units, named):
    has, why = cpu_bf16(flags)
    assert has is units
    assert (named in why) if units else ("no native bf16" in why)
    assert ("has bf16 matrix units" in why) is (
        "amx_bf16" in flags
    )  # AMX: matrix; AVX512-BF16: vector


@pytest.mark.parametrize("flags", [AMX, AVX512_BF16, NEITHER])
def test_off_is_fp32_and_a_gpu_gets_bf16_on_any_cpu(flags):
    assert resolve_amp("off", CPU, True, flags)[0] is None
    assert resolve_amp("off", GPU, True, flags)[0] is None
    assert resolve_amp("auto", GPU, False, flags)[0] is torch.bfloat16
    assert resolve_amp("fp16", GPU, False, flags)[0] is torch.float16


@pytest.mark.parametrize(("flags", "units"), [(AMX, True), (AVX512_BF16, False), (NEITHER, False)])
def test_auto_on_a_cpu_is_bf16_only_with_bf16_matrix_units_and_a_validated_stage(flags, units):
    # matrix units: AMX (the Xeon type); AVX512-BF16 alone (the AMD Zen 4 type) stays fp32
    dtype, why = resolve_amp("auto", CPU, validated_on_cpu=True, flags=flags)
    assert dtype is (torch.bfloat16 if units else None), why
    dtype, why = resolve_amp("auto", CPU, validated_on_cpu=False, flags=flags)
    assert dtype is None
    assert ("not checked yet" in why) is units  # the reason says which condition failed
    assert ("amp=bf16 forces" in why) is (flags != NEITHER)


@pytest.mark.parametrize(
    ("flags", "emulated"), [(AMX, False), (AVX512_BF16, False), (NEITHER, True)]
)
def test_explicit_bf16_is_bf16_and_says_when_it_is_emulated(flags, emulated):
    dtype, why = resolve_amp("bf16", CPU, validated_on_cpu=False, flags=flags)
    assert dtype is torch.bfloat16
    assert ("emulated" in why) is emulated


def test_pretext_and_fine_tuning_are_validated_for_cpu_bf16():
    # docs/precision.md: both checked on val on the AMX and the AMD type (PROFILE=precision);
    # mmdet / mmseg and feature extraction have no amp key
    assert set(machine.CPU_BF16_STAGES) == {"pretext", "classify"}


@pytest.mark.parametrize(("flags", "dtype"), [(AMX, torch.bfloat16), (AVX512_BF16, None),
                                              (NEITHER, None)])  # fmt: skip
def test_the_builtin_config_is_bf16_on_a_cpu_with_amx_and_fp32_elsewhere(monkeypatch, flags, dtype):
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    cfg = resolve(Config())
    assert cfg.amp == "auto"
    assert step_settings(cfg, CPU)[1] is dtype
    monkeypatch.setattr(machine, "CPU_BF16_STAGES", frozenset())  # a stage not validated: fp32
    assert step_settings(cfg, CPU)[1] is None


def test_precision_names():
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == [
        "fp32",
        "bf16",
        "fp16",
    ]


def test_resuming_under_another_precision_is_refused_and_writes_nothing(
    tiny_train_args, tmp_path, monkeypatch, capsys
):
    # A run started where amp=auto is bf16 (a CPU with AMX, pretext validated), interrupted ...
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(machine, "CPU_BF16_STAGES", frozenset({"pretext"}))
    args = [*tiny_train_args, "optim.steps=6", "fail_at_step=5"]
    with pytest.raises(FloatingPointError):
        main(parse_config(args))
    run_dir = tmp_path / "run"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["precision"] == "bf16" and "amx_bf16" in meta["precision_reason"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # ... then resumed with the same config on a machine where it resolves to fp32
    monkeypatch.setattr(machine, "cpu_flags", lambda: NEITHER)
    with pytest.raises(SystemExit) as exit_:
        cli([*tiny_train_args, "optim.steps=6"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err)
    assert str(run_dir) in errors[0] and "precision on this machine: 'bf16' -> 'fp32'" in errors[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # the same machine resumes it, recording the same precision
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    assert main(parse_config([*tiny_train_args, "optim.steps=6"]))["steps"] == 6
    assert json.loads((run_dir / "meta.json").read_text())["precision"] == "bf16"


@dataclass
class _Cfg:
    lr: float = 0.1
    force: bool = False


def test_a_recorded_fact_is_compared_only_when_a_run_resumes(tmp_path):
    bf16, fp32 = {"precision": "bf16"}, {"precision": "fp32"}
    old = tmp_path / "old"  # a folder from before precision was recorded: resumes
    run_folder.start(old, _Cfg(), {})
    (old / "last.pt").write_bytes(b"x")
    run_folder.check_unchanged(old, _Cfg(), set(), facts=fp32)
    run = tmp_path / "run"
    run_folder.start(run, _Cfg(), dict(bf16))
    (run / "last.pt").write_bytes(b"x")
    run_folder.check_unchanged(run, _Cfg(), set(), facts=bf16)
    with pytest.raises(
        run_folder.RunFolderError, match="precision on this machine: 'bf16' -> 'fp32'"
    ):
        run_folder.check_unchanged(run, _Cfg(), set(), facts=fp32)
    run_folder.check_unchanged(run, _Cfg(force=True), set(), facts=fp32)  # force=true resumes
    run_folder.finish(run, {"loss": 1.0}, dict(bf16))
    assert run_folder.open_run(run, _Cfg(), set(), facts=fp32) == {"loss": 1.0}  # its record


@pytest.mark.parametrize(("flags", "recorded"), [(AMX, "bf16"), (AVX512_BF16, "fp32")])
def test_a_builtin_cpu_run_records_its_precision_and_why(
    tiny_train_args, tmp_path, monkeypatch, flags, recorded
):
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    main(parse_config([*tiny_train_args, "optim.steps=2", "checkpoint_every=2"]))
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["precision"] == recorded and meta["precision_reason"].startswith("amp=auto")
    assert ("has bf16 matrix units" in meta["precision_reason"]) is (recorded == "bf16")
