"""Measurement discipline shared by every suite.

The providers of one case (ours, SDPA, naive, ...) are timed interleaved: each round
times every provider once (on the CPU right after an untimed call of the same
provider), in an order rotated from round to round, so a slow spell of a shared
machine lands on all of them rather than on whichever ran then. Rounds go on
until every provider's median is known to within TARGET_CI (a distribution-free 95%
confidence interval from order statistics), or the case's time budget is spent.
Every figure carries its spread (half the interquartile range), that interval and its
samples in round order, so a speed-up is taken round by round (two providers' calls of
one round ran seconds apart at most, under the same load) and its own interval says
when it means nothing (report.annotate_ratios).

GPU: CUDA events around each call, L2 flushed before it (as triton.testing.do_bench
does); peak memory from the CUDA allocator.
CPU: a fixed thread count (set_cpu_threads, recorded in the report). With one thread
(the default) the clock is that thread's CPU time, which time slices given to other
processes do not inflate: on the project's busy 2-core machine it halved the spread of
an SDPA call (wall clock +-7%, thread time +-2%) and removed a 50% inflation of its
median. With more threads, whose work that clock would miss, the wall clock. Peak memory as the growth of the process's peak resident set during one
call, after freed heap memory has been handed back to the system (Linux/glibc), so
that memory reused from earlier calls still counts.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Discipline:
    """When a case's rounds stop: at least min_rounds, then as soon as every median's
    95% interval is within target_ci of it, or after budget_s seconds or max_rounds."""

    min_rounds: int
    max_rounds: int
    budget_s: float
    target_ci: float


# GPU timings are steady (a few rounds suffice); a shared CPU needs more rounds and time.
GPU_DISCIPLINE = Discipline(min_rounds=10, max_rounds=400, budget_s=1.5, target_ci=0.01)
CPU_DISCIPLINE = Discipline(min_rounds=9, max_rounds=300, budget_s=6.0, target_ci=0.02)


def discipline_for(device: torch.device) -> Discipline:
    return GPU_DISCIPLINE if device.type == "cuda" else CPU_DISCIPLINE


def default_cpu_threads() -> int:
    """One thread: on a shared machine more threads wait on each other's cores (on the
    project's 2-core machine two threads made small ops snap to multiples of 8 ms and
    pause for 400 ms), and one thread is the same setting on every machine."""
    return 1


def set_cpu_threads(threads: int) -> int:
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def median_interval(samples: list[float]) -> tuple[float, float]:
    """The 95% confidence interval of the median from order statistics (no assumption
    about the distribution): with few samples it is the whole range."""
    ordered = sorted(samples)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)  # 1.96 / 2 standard deviations of Binomial(n, 1/2)
    low = max(1, round(n / 2 - half))
    high = min(n, round(1 + n / 2 + half))
    return ordered[low - 1], ordered[high - 1]


@dataclass
class Timing:
    median_ms: float
    spread_pct: float  # half the interquartile range, in % of the median
    ci_low_ms: float
    ci_high_ms: float
    samples: int

    @staticmethod
    def of(samples: list[float]) -> "Timing":
        median = statistics.median(samples)
        if len(samples) > 1:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        else:
            q1 = q3 = median
        low, high = median_interval(samples)
        return Timing(median, 100 * (q3 - q1) / 2 / median, low, high, len(samples))

    def relative_ci(self) -> float:
        """The larger distance from the median to an end of its interval, relative to it."""
        return max(self.median_ms - self.ci_low_ms, self.ci_high_ms - self.median_ms) / self.median_ms


def _status_mib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def steady_cpu_allocator() -> bool:
    """Makes glibc serve every block from its heap and keep freed memory for reuse
    instead of returning it to the system, as PyTorch's caching allocator does on a
    GPU: a call then reuses the pages of the previous one, and its time no longer
    includes page faults, whose cost depends on the rest of the machine. On the
    project's busy machine naive attention took 46-69 ms a call with them and
    24.4-25.3 ms without; the Transformer at M=2048, whose 64 MiB score blocks glibc
    would map afresh each call, 257-274 ms against 139-147 ms. Returns whether it took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_MAX (-4) = 0: no block from mmap; M_TRIM_THRESHOLD (-1): 1 GiB.
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**30))
    except (OSError, AttributeError):
        return False


def _trim_heap() -> None:
    """Hands freed heap memory back to the system (glibc), so that a call whose memory
    the allocator would reuse from earlier calls shows up in the resident set again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> Optional[float]:
    """Resets the peak resident set to the current one; returns that (MiB), None where unsupported."""
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def _peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory one call adds on top of what the process already holds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    resident = _reset_peak_rss()
    fn()
    peak = _status_mib("VmHWM")
    return None if resident is None or peak is None else max(0.0, peak - resident)


def clock_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA events"
    return "thread CPU time" if torch.get_num_threads() == 1 else "wall clock"


class _Clock:
    """Times one round: each call in turn, milliseconds per call."""

    def __init__(self, device: torch.device):
        self.device = device
        # As do_bench: a 256 MiB buffer zeroed before each call evicts the L2 cache.
        self.flush = torch.empty(2**26, dtype=torch.int32, device=device) if device.type == "cuda" else None
        self.now = time.thread_time if clock_name(device) == "thread CPU time" else time.perf_counter

    def round(self, fns: list[Callable[[], object]]) -> list[float]:
        if self.flush is None:
            times = []
            for fn in fns:
                # Untimed first, so that the timed call finds its caches and allocator
                # as a loop of its own would leave them, whichever provider ran before:
                # without it each provider's times mixed calls after itself and after
                # another (with two providers the Perceiver IO stack's times split in two).
                fn()
                start = self.now()
                fn()
                times.append((self.now() - start) * 1e3)
            return times
        events = []
        for fn in fns:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]


def _refusal(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    return "unsupported: " + str(error).splitlines()[0][:120] if str(error) else "unsupported"


def measure_case(calls: dict[str, Callable[[], object]], device: torch.device,
                 discipline: Optional[Discipline] = None) -> dict[str, dict]:
    """Times the providers of one case interleaved; result fields per provider name.

    A provider that raises (an SDPA backend or ours refusing the inputs, out of memory)
    gets a status instead of figures; the others are still measured."""
    discipline = discipline or discipline_for(device)
    results: dict[str, dict] = {}
    peaks: dict[str, Optional[float]] = {}
    for name, fn in calls.items():
        try:
            fn()  # warm-up: compilation, autotuning, allocator growth
            peaks[name] = _peak_mib(fn, device)
        except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
            results[name] = {"status": _refusal(error)}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    running = [name for name in calls if name not in results]
    samples: dict[str, list[float]] = {name: [] for name in running}
    clock = _Clock(device)
    start = time.perf_counter()
    rounds = 0
    while running:
        shift = rounds % len(running)
        order = running[shift:] + running[:shift]
        try:
            times = clock.round([calls[name] for name in order])
        except torch.OutOfMemoryError as error:  # memory another provider left fragmented
            for name in order:
                results[name] = {"status": _refusal(error)}
            break
        for name, elapsed in zip(order, times):
            samples[name].append(elapsed)
        rounds += 1
        if rounds < discipline.min_rounds:
            continue
        settled = all(Timing.of(samples[name]).relative_ci() <= discipline.target_ci for name in running)
        if settled or rounds >= discipline.max_rounds or time.perf_counter() - start >= discipline.budget_s:
            break
    for name in running:
        if name in results:
            continue
        timing = Timing.of(samples[name])
        results[name] = {"status": "ok", "median_ms": timing.median_ms, "spread_pct": timing.spread_pct,
                         "ci_low_ms": timing.ci_low_ms, "ci_high_ms": timing.ci_high_ms,
                         "samples": timing.samples, "peak_mib": peaks[name],
                         "samples_ms": [round(t, 5) for t in samples[name]]}
    return {name: results[name] for name in calls}


def ceilings(device: torch.device) -> dict[str, float]:
    """The device's matmul TFLOP/s and copy GB/s, measured now (the roofline's ceilings).

    The rate a machine reaches undisturbed: the fastest tenth of the calls, and on the
    CPU the better of two sizes (with one thread, 1024^2 fp32 runs at half the rate of
    2048^2 on the project's machine)."""
    if device.type == "cuda":
        sizes, dtype, copy_elems = (8192,), torch.bfloat16, 2**28
    else:
        sizes, dtype, copy_elems = (1024, 2048), torch.float32, 2**24

    def fastest_ms(fn):
        fn()
        clock = _Clock(device)
        times = [t for _ in range(10) for t in clock.round([fn])]
        return statistics.quantiles(times, n=10, method="inclusive")[0]

    rates = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates.append(2 * n**3 / (fastest_ms(lambda: a @ b) * 1e-3) / 1e12)
        del a, b
    src = torch.randn(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = fastest_ms(lambda: dst.copy_(src))
    return {
        "matmul_tflops": max(rates),
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_gbps": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9,  # bytes read + written
    }


def load_average() -> Optional[tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except OSError:
        return None


def throughput(flops: int, median_ms: float) -> float:
    """TFLOP/s of a call of `flops` that takes median_ms."""
    return flops / (median_ms * 1e-3) / 1e12
