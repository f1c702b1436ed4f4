"""The `host` suite: what a call costs the CPU, apart from the attention itself.

- "dispatch": cross_attention's argument validation and backend choice alone
  (perceiver_kernels.problem.validate, then dispatch.select), per call, on any device.
- "launch path 8x8x512x512 d64": the whole Triton call with the kernels' launches
  stubbed (validation, the cached plan, the outputs' allocation, the arguments), on any
  device: the host cost that is ours; on a GPU the "call" rows add Triton's launcher.
- "call <shape>" (GPU): whole calls at steady state on shapes whose GPU work is
  shorter than the host's, timed as LOOP calls back to back with one synchronisation
  at the end, so the time per call is the host's; our backends against SDPA.

Rows carry the per-call time in median_ms (and its samples), like every suite, so
the report's speed-up column compares with SDPA the same way.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import perceiver_kernels as pk
from perceiver_kernels import dispatch
from perceiver_kernels.backends import BACKENDS
from perceiver_kernels.problem import validate

from .harness import measure_case

LOOP = 1000
# (B, H, N, D) of self-attention-sized calls: a single tiny head, and the latent array.
CALL_SHAPES = {"call 1x1x16x16 d64": (1, 1, 16, 64), "call 8x8x512x512 d64": (8, 8, 512, 64)}


LAUNCH_PATH = "launch path 8x8x512x512 d64"


def cases(device: torch.device, size: str) -> list[str]:
    return ["dispatch", LAUNCH_PATH] + (list(CALL_SHAPES) if device.type == "cuda" else [])


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` takes the arguments, launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _kernels_stubbed():
    from perceiver_kernels.triton import configs

    originals = {name: getattr(module, name) for name, module in configs.MODULES.items()}
    try:
        for name, module in configs.MODULES.items():
            setattr(module, name, _NoLaunch())
        yield
    finally:
        for name, module in configs.MODULES.items():
            setattr(module, name, originals[name])


def _looped(fn: Callable[[], object]) -> Callable[[], None]:
    def run():
        for _ in range(LOOP):
            fn()
    return run


def _per_call(result: dict) -> dict:
    """measure_case's figures of LOOP calls, per call."""
    if result["status"] != "ok":
        return result
    scaled = {key: result[key] / LOOP for key in ("median_ms", "ci_low_ms", "ci_high_ms")}
    return {**result, **scaled, "samples_ms": [t / LOOP for t in result["samples_ms"]],
            "us_per_call": scaled["median_ms"] * 1e3, "peak_mib": None}


def run_suite(device: torch.device, size: str, ceilings: dict, progress: Callable[[str], None],
              rows: Optional[list] = None) -> list[dict]:
    """Measures every case; appends each row to `rows` (a new list by default) as it is
    measured, so that a stopped run keeps what it measured, and returns it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [] if rows is None else rows
    for case in cases(device, size):
        progress(f"host {case}")
        if case == "dispatch":
            q = torch.randn(8, 8, 512, 64, device=device, dtype=dtype)

            def choose(backend: str) -> Callable[[], object]:
                return lambda: dispatch.select(validate(q, q, q, None, None, None).problem, backend)

            calls = {"perceiver_kernels": choose("auto"), "perceiver_kernels[torch]": choose("torch")}
        elif case == LAUNCH_PATH:
            q = torch.randn(8, 8, 512, 64, device=device, dtype=torch.float16 if device.type == "cpu" else dtype)
            triton = BACKENDS["triton"]
            with _kernels_stubbed():
                results = measure_case({"perceiver_kernels[triton]": _looped(
                    lambda: triton.run(validate(q, q, q, None, None, None)))}, device)
            for name, result in results.items():
                rows.append({"suite": "host", "pass": "host", "case": case, "provider": name,
                             "dtype": str(q.dtype)[6:], **_per_call(result)})
            continue
        else:
            q = torch.randn(*CALL_SHAPES[case], device=device, dtype=dtype)
            calls = {"perceiver_kernels": lambda: pk.cross_attention(q, q, q),
                     "perceiver_kernels[triton]": lambda: pk.cross_attention(q, q, q, backend="triton"),
                     "perceiver_kernels[cuda]": lambda: pk.cross_attention(q, q, q, backend="cuda"),
                     "sdpa": lambda: F.scaled_dot_product_attention(q, q, q)}
        for name, result in measure_case({name: _looped(fn) for name, fn in calls.items()}, device).items():
            rows.append({"suite": "host", "pass": "host", "case": case, "provider": name, "dtype": str(dtype)[6:],
                         **_per_call(result)})
    return rows
