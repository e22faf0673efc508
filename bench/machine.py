"""What the machine can do and what a measurement used: the fp32 (and bf16) matmul rate and peak RSS.

Peak RSS is the kernel's high-water mark (``VmHWM`` in /proc/self/status), reset before each
measurement by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so one process can measure several
things in turn. Where that is not allowed the figure is the process's peak so far (``reset: false``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def matmul_gflops(n: int = 2048, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an [n, n] @ [n, n] matmul in ``dtype`` (fp32; bf16: oneDNN's kernels on a
    CPU with bf16 units) on the CPU's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, BLAS buffers
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.peak_mb`` (high-water RSS during the block), ``m.start_mb``."""

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start_mb = _status_kb("VmRSS") / 1024
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = _status_kb("VmHWM") / 1024

    def as_dict(self) -> dict[str, float | bool]:
        return {"peak_rss_mb": round(self.peak_mb, 1), "rss_before_mb": round(self.start_mb, 1),
                "reset": self.reset}  # fmt: skip
