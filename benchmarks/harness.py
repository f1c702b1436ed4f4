"""Measurement discipline shared by every suite: warm, median of many runs, peak memory.

GPU: triton.testing.do_bench (CUDA events, L2 flushed before each run, median); peak
memory from the CUDA allocator.
CPU: a monotonic clock with the same discipline (warm-up, median over repeats); peak
memory as the growth of the process's peak resident set during one call (Linux:
reset through /proc/self/clear_refs, read from VmHWM), an upper bound on what the
case allocated.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    spread_ms: float  # (80th - 20th percentile) / 2
    peak_mib: Optional[float]


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return cuts[1], statistics.median(samples), cuts[7]


def _status_mib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> Optional[float]:
    """Resets the peak resident set to the current one; returns that (MiB), None where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def measure(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.3) -> Timing:
    """Times fn (inputs already on device). Raises torch.OutOfMemoryError unchanged."""
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        p20, median, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return Timing(median, (p80 - p20) / 2, peak)
    peak = None
    resident = _reset_peak_rss()
    fn()
    if resident is not None and _status_mib("VmHWM") is not None:
        peak = max(0.0, _status_mib("VmHWM") - resident)  # what the case added on top of the process
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_seconds and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    p20, median, p80 = _quantiles(samples)
    return Timing(median, (p80 - p20) / 2, peak)


def guarded_measure(fn: Callable[[], object], device: torch.device, flops: int) -> dict:
    """measure() as result fields; out of memory and refusals become a status, not a crash."""
    try:
        timing = measure(fn, device)
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    except (RuntimeError, ValueError) as error:  # an SDPA backend or ours (BackendRefusedError) refusing
        return {"status": "unsupported: " + str(error).splitlines()[0][:120]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "median_ms": timing.median_ms, "spread_ms": timing.spread_ms, "peak_mib": timing.peak_mib,
            "tflops": flops / (timing.median_ms * 1e-3) / 1e12}


def ceilings(device: torch.device) -> dict[str, float]:
    """The device's matmul TFLOP/s and copy GB/s, measured now (the roofline's ceilings)."""
    if device.type == "cuda":
        n, dtype, copy_elems = 8192, torch.bfloat16, 2**28
    else:
        n, dtype, copy_elems = 1024, torch.float32, 2**24
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = measure(lambda: a @ b, device).median_ms
    src = torch.randn(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), device).median_ms
    return {
        "matmul_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_gbps": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9,  # bytes read + written
    }
