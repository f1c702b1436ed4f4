"""Compiles the Triton kernels for NVIDIA GPUs on a machine without one.

The interpreter that runs the kernels in CI executes them in numpy: it never meets
the compiler, so it cannot see code that only fails on a GPU (a global Triton
refuses, a dot too small for the tensor cores, a tile that overflows shared memory).
This module runs the real launchers of perceiver_kernels.triton_launch on CPU tensors
with the kernels swapped for recorders, then compiles each recorded launch with
Triton's own argument specialization, for every config the autotuner would try after
pruning (or the one fixed config when PERCEIVER_KERNELS_AUTOTUNE=0), through PTX to
SASS with Triton's ptxas, for sm_80 and sm_90. A stand-in driver reports the target
being compiled for and launches nothing. Each compiled kernel's shared memory,
registers and spills come back as one JSON record per line.

It must run with TRITON_INTERPRET unset (the decorators read it at import), so the
tests call it in a subprocess:

    python -m tests.triton_compile --dtypes bfloat16 --head-dims 64/64 --arch 90 --shard 0/2

Triton's internals are used where a launch uses them (JITFunction.warmup, the
autotuner's pruning, the active driver); where this Triton lacks one, the module
exits with MISSING_INTERNALS_EXIT and the tests skip with the reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

# Largest dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# the limit Triton checks at launch: A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
# Exit status when this Triton lacks an internal the check drives (the tests skip then).
MISSING_INTERNALS_EXIT = 3


@dataclass(frozen=True)
class Problem:
    """One forward + backward call of the launchers."""

    dtype: str
    head_dim_qk: int
    head_dim_v: int
    num_queries: int
    num_keys: int
    masked: bool = True
    residual: bool = True
    causal: bool = False

    @property
    def label(self) -> str:
        shape = "encode" if self.num_keys > self.num_queries else "decode"
        extras = "".join(("+mask" if self.masked else "", "+residual" if self.residual else "",
                          "+causal" if self.causal else ""))
        return f"{self.dtype} {self.head_dim_qk}/{self.head_dim_v} {shape}{extras}"


HEAD_DIMS = ((16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (32, 160))
# The wide kernels (above 256): rows not 16-byte aligned (261, the most registers), Dv in
# ten forward slices (32/1280), both wide and aligned (512/512), a narrow Dv (1280/24).
WIDE_HEAD_DIMS = ((261, 261), (32, 1280), (512, 512), (1280, 24))
DTYPES = ("float16", "bfloat16", "float32")


def problems(dtypes=DTYPES, head_dims=HEAD_DIMS, flags=((True, True),), causal: bool = False) -> list[Problem]:
    """An ENCODE and a DECODE problem for each dtype, (Dqk, Dv) and (masked, residual);
    with `causal`, their causal twins too.

    ENCODE runs split (split and merge kernels; record_launches forces it) and the
    fused or chunked-dQ backward; DECODE takes the one-program-per-tile kernel and the
    fused or chunked-dK/dV backward.
    """
    return [Problem(dtype, dqk, dv, num_queries, num_keys, masked, residual, is_causal)
            for dtype in dtypes for dqk, dv in head_dims for masked, residual in flags
            for num_queries, num_keys in ((128, 4096), (4096, 128)) for is_causal in ((False, True) if causal else (False,))]


class _Recorder:
    """Takes a kernel's place in the launchers: `kernel[grid](*args, **kwargs)` is recorded, not run."""

    def __init__(self, kernel, launches: list):
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(problem: Problem, allow_tf32: bool = False, arch: int | None = None) -> list[tuple]:
    """(kernel, args, kwargs) of every launch of one forward and one backward call.

    The launches take the configs the launchers choose for a GPU of compute capability
    `arch` (its shared memory included), or for the interpreter when arch is None;
    under PERCEIVER_KERNELS_AUTOTUNE=1, _configs_to_try adds the tuning space.
    """
    from perceiver_kernels import triton_configs, triton_launch
    from perceiver_kernels.kernels import (attention_bwd, attention_bwd_fused, attention_bwd_wide, attention_fwd,
                                           attention_fwd_wide)

    dtype = getattr(torch, problem.dtype)
    batch, heads = 1, 2
    q = torch.randn(batch, heads, problem.num_queries, problem.head_dim_qk, dtype=dtype)
    k = torch.randn(batch, heads, problem.num_keys, problem.head_dim_qk, dtype=dtype)
    v = torch.randn(batch, heads, problem.num_keys, problem.head_dim_v, dtype=dtype)
    mask = torch.zeros(batch, problem.num_keys, dtype=torch.bool) if problem.masked else None
    residual = torch.randn(batch, heads, problem.num_queries, problem.head_dim_v, dtype=dtype) \
        if problem.residual else None
    scale = problem.head_dim_qk**-0.5

    launches: list = []
    kernels = [(attention_fwd, name) for name in ("attention_fwd_kernel", "attention_fwd_split_kernel",
                                                  "merge_splits_kernel")]
    kernels += [(attention_bwd, name) for name in ("attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel",
                                                   "attention_bwd_dq_kernel")]
    kernels += [(attention_bwd_fused, name) for name in ("attention_bwd_encode_kernel", "attention_bwd_decode_kernel")]
    kernels += [(attention_fwd_wide, name) for name in ("attention_fwd_wide_kernel", "attention_fwd_wide_split_kernel")]
    kernels += [(attention_bwd_wide, name)
                for name in ("attention_bwd_wide_delta_kernel", "attention_bwd_wide_dkdv_kernel",
                             "attention_bwd_wide_dq_kernel")]
    originals = [(module, name, getattr(module, name)) for module, name in kernels]
    originals += [(triton_configs, "AUTOTUNE", triton_configs.AUTOTUNE),
                  (triton_configs, "device_facts", triton_configs.device_facts),
                  (triton_configs, "choose", triton_configs.choose)]
    try:
        for module, name, kernel in originals[: len(kernels)]:
            setattr(module, name, _Recorder(kernel, launches))
        triton_configs.AUTOTUNE = False  # the table's config is recorded; _configs_to_try adds the tuning space
        if arch is not None:
            facts = (f"sm_{arch}", SHARED_MEMORY_LIMIT[arch])
            triton_configs.device_facts = lambda device: facts
            triton_configs.choose = functools.lru_cache(maxsize=None)(triton_configs.choose.__wrapped__)
        # ENCODE forces a split, so the split and merge kernels are compiled whatever the tiles.
        num_splits = 3 if problem.num_keys > problem.num_queries else None
        out, lse = triton_launch.run_triton_forward(q, k, v, mask, residual, scale, allow_tf32=allow_tf32,
                                                    num_splits=num_splits, causal=problem.causal)
        out, lse = torch.randn_like(out), torch.randn_like(lse)
        for variant in triton_launch.BACKWARD_VARIANTS:  # the fused kernels and the general ones
            os.environ["PERCEIVER_KERNELS_BACKWARD"] = variant
            triton_launch.run_triton_backward(torch.randn_like(out), q, k, v, mask, residual, out, lse, scale,
                                              allow_tf32=allow_tf32, causal=problem.causal)
    finally:
        os.environ.pop("PERCEIVER_KERNELS_BACKWARD", None)
        for module, name, original in originals:
            setattr(module, name, original)
        triton_launch._forward_launch.cache_clear()
        triton_launch.plan_triton_backward.cache_clear()
    return launches


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports the target, launches nothing.

    The device index is the architecture, so each target gets its own compile cache.
    """

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


def _configs_to_try(kernel, args, kwargs, arch: int) -> list[dict]:
    """The launch's own config, or under PERCEIVER_KERNELS_AUTOTUNE=1 every config the
    autotuner would try for it (the tuning space pruned for this shape class and target)."""
    from perceiver_kernels import triton_configs

    name = kernel.__name__
    if not triton_configs.AUTOTUNE or name not in triton_configs.SEARCH_SPACES:
        return [{}]
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    shape = triton_configs.shape_class(name, named)
    device_facts = triton_configs.device_facts
    try:
        triton_configs.device_facts = lambda device: (f"sm_{arch}", SHARED_MEMORY_LIMIT[arch])
        space = triton_configs.search_space(shape, torch.device("cpu"))
    finally:
        triton_configs.device_facts = device_facts
    return [config.kwargs(name) for config in space]


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK and LOCAL of the cubin's kernel, as cuobjdump reports them."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    usage = {}
    for line in report.splitlines():
        if "REG:" in line:
            for field in line.split():
                key, _, value = field.partition(":")
                if key in ("REG", "STACK", "LOCAL") and value.isdigit():
                    usage[key.lower()] = int(value)
    return usage


@dataclass
class CompileRecord:
    problem: str
    kernel: str
    arch: int
    config: dict
    error: str | None = None
    shared_bytes: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    wgmma: int | None = None  # Hopper warpgroup matrix instructions in the PTX


def compile_launch(kernel, args, kwargs, arch: int, problem: Problem) -> Iterator[CompileRecord]:
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    jit_function = kernel if isinstance(kernel, JITFunction) else kernel.fn  # an autotuner wraps one
    # This process only compiles, so the stand-in is never swapped back.
    driver.set_active(_CompileOnlyDriver(arch))
    for config in _configs_to_try(jit_function, args, kwargs, arch):
        launch = {**kwargs, **config}
        record = CompileRecord(problem.label, jit_function.__name__, arch,
                               {key: value for key, value in launch.items()
                                if key in ("BLOCK_M", "BLOCK_N", "BLOCK_INNER", "num_warps", "num_stages")})
        try:
            compiled = jit_function.warmup(*args, grid=(1,), **launch)
        except Exception as error:  # noqa: BLE001 (every compile failure is a finding)
            record.error = f"{type(error).__name__}: {error}"[:2000]
        else:
            record.shared_bytes = compiled.metadata.shared
            usage = _resource_usage(compiled.asm["cubin"])
            record.registers, record.stack_bytes = usage.get("reg"), usage.get("stack")
            record.local_bytes = usage.get("local")
            record.wgmma = compiled.asm["ptx"].count("wgmma.mma_async")
        yield record


def _triton_version() -> str:
    import triton

    return triton.__version__


def _missing_internals() -> str | None:
    from triton.runtime import autotuner, driver, jit

    needs = ((jit.JITFunction, "warmup"), (driver, "set_active"))
    missing = [f"{getattr(owner, '__name__', 'driver')}.{name}" for owner, name in needs if not hasattr(owner, name)]
    return ", ".join(missing) or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.triton_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated torch dtypes")
    parser.add_argument("--head-dims", default=",".join(f"{a}/{b}" for a, b in HEAD_DIMS),
                        help="comma-separated Dqk/Dv pairs")
    parser.add_argument("--both-flags", action="store_true",
                        help="also compile without mask and residual (default: both on)")
    parser.add_argument("--causal", action="store_true", help="also compile the causal launches")
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th launch from the i-th")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 makes the kernels interpreted: unset it")
    shard, shards = (int(part) for part in args.shard.split("/"))
    missing = _missing_internals()
    if missing:
        print(f"this Triton ({_triton_version()}) lacks {missing}, which the compile check drives", file=sys.stderr)
        sys.exit(MISSING_INTERNALS_EXIT)

    head_dims = [tuple(int(d) for d in pair.split("/")) for pair in args.head_dims.split(",")]
    flags = ((True, True), (False, False)) if args.both_flags else ((True, True),)
    chosen = problems(args.dtypes.split(","), head_dims, flags, args.causal)
    work = [(arch, problem, launch) for problem in chosen for arch in (int(a) for a in args.arch.split(","))
            for launch in record_launches(problem, arch=arch)]
    for index, (arch, problem, (kernel, launch_args, launch_kwargs)) in enumerate(work):
        if index % shards != shard:
            continue
        for record in compile_launch(kernel, launch_args, launch_kwargs, arch, problem):
            print(json.dumps(asdict(record)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
