"""The machine a stage runs on: its device (:func:`pick_device`), the precision a step runs in
there (:func:`resolve_amp`, docs/precision.md) and what a number was measured on (times differ by
up to ~2x between the machines here)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU; any other name as torch reads it."""
    import torch  # here: orchestrate reads this module for cpu_model without loading torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    return cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


# ---- precision: which autocast dtype a step runs in ----------------------------------------------

# The stages whose bf16 autocast on a CPU is checked against fp32 on val (docs/precision.md): for
# them ``amp=auto`` is bf16 on a CPU with bf16 matrix units (AMX). Stage names: ``pretext`` (every
# pretext method, the supervised one included) and ``classify`` (transfer.classify's fine-tuning).
# Both checked with PROFILE=precision on the Xeon type (AMX) and the AMD type, 3 seeds each:
# results/precision/precision.md, precision_pooled.md. A CPU without AMX stays fp32.
CPU_BF16_STAGES: frozenset[str] = frozenset({"pretext", "classify"})

# The CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic, which oneDNN uses for a bf16
# matmul / convolution: Intel AMX tiles (``amx_bf16``: matrix units, Sapphire Rapids and later) and
# the AVX512-BF16 dot-product instructions (``avx512_bf16``: vector units, AMD Zen 4, Cooper Lake).
MATRIX_BF16_FLAG = "amx_bf16"
BF16_FLAGS = (MATRIX_BF16_FLAG, "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((cpuinfo("flags") or "").split())


def cpu_bf16(flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether the CPU does bf16 arithmetic natively, with matrix or vector units, why) from its
    ``flags`` (default: :func:`cpu_flags`). Where it does not, bf16 is emulated."""
    flags = cpu_flags() if flags is None else set(flags)
    found = [f for f in BF16_FLAGS if f in flags]
    if MATRIX_BF16_FLAG in flags:
        return True, f"the CPU has bf16 matrix units ({' '.join(found)})"
    if found:
        return True, (
            f"the CPU has bf16 vector instructions ({' '.join(found)}) but no bf16 matrix units "
            f"(no {MATRIX_BF16_FLAG} flag)"
        )
    return False, f"the CPU has no native bf16 (no {' / '.join(BF16_FLAGS)} flag)"


PRECISIONS = {"bf16": "bfloat16", "fp16": "float16"}  # amp= value -> torch dtype name


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32`` (no autocast), ``bf16`` or ``fp16``: how a run folder records its precision."""
    if dtype is None:
        return "fp32"
    return {v: k for k, v in PRECISIONS.items()}[str(dtype).removeprefix("torch.")]


def resolve_amp(
    amp: str, device: torch.device, validated_on_cpu: bool, flags: set[str] | None = None
) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why) of ``amp`` (auto | off | bf16 | fp16) on ``device``.

    ``off``: fp32. ``bf16`` / ``fp16``: that dtype (bf16 on a CPU without native bf16 is emulated,
    said in the reason). ``auto``: bf16 on a GPU; on a CPU bf16 only where it has bf16 matrix units
    (``amx_bf16`` in ``flags``, the Intel Xeon type here) and the stage is ``validated_on_cpu``
    (:data:`CPU_BF16_STAGES`), else fp32: a CPU with bf16 vector instructions only (``avx512_bf16``,
    the AMD EPYC type here) stays fp32 under ``auto`` and runs bf16 with ``amp=bf16`` (docs/precision.md).
    """
    import torch

    if amp == "off":
        return None, "amp=off: fp32"
    if amp in PRECISIONS:
        dtype = getattr(torch, PRECISIONS[amp])
        if amp == "bf16" and device.type == "cpu":
            units, why = cpu_bf16(flags)
            note = "" if units else ": bf16 is emulated, likely slower than fp32"
            return dtype, f"amp=bf16 on the CPU; {why}{note}"
        return dtype, f"amp={amp} on {device.type}"
    if amp != "auto":
        raise ValueError(f"amp: {amp!r} is none of auto, off, {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return torch.bfloat16, "amp=auto on a GPU: bf16"
    if device.type != "cpu":
        return None, f"amp=auto on {device.type}: fp32"
    flags = cpu_flags() if flags is None else set(flags)
    native, why = cpu_bf16(flags)
    if MATRIX_BF16_FLAG not in flags:
        return None, f"amp=auto on the CPU: fp32; {why}" + ("; amp=bf16 forces bf16" * native)
    if not validated_on_cpu:
        return None, (
            f"amp=auto on the CPU: fp32; {why}, but this stage's bf16 quality on val is not "
            "checked yet (core.machine.CPU_BF16_STAGES; amp=bf16 forces it)"
        )
    return torch.bfloat16, f"amp=auto on the CPU: bf16; {why}"
