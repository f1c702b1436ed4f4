"""Compiles the Triton kernels for NVIDIA GPUs on a machine without one.

The interpreter that runs the kernels in CI executes them in numpy: it never meets
the compiler, so it cannot see code that only fails on a GPU (a global Triton
refuses, a dot too small for the tensor cores, a tile that overflows shared memory).
This module runs the real launchers of perceiver_kernels.triton on CPU tensors
with the kernels swapped for recorders, then compiles each recorded launch with
Triton's own argument specialization, with its table config (a `tuned` suite: every
config autotuning would try after pruning), through PTX to
SASS with Triton's ptxas, for sm_80 and sm_90. A stand-in driver reports the target
being compiled for and launches nothing. Each compiled kernel's shared memory,
registers and spills come back as one JSON record per line.

The launches of all the suites (SUITES) are recorded first and compiled once each:
many cases launch the same kernel with the same specialization and config, and a
record names every case and suite it serves.

It must run with TRITON_INTERPRET unset (the decorators read it at import), so the
tests call it in a subprocess:

    python -m tests.triton_compile --shard 0/2                      # every suite, half the compiles
    python -m tests.triton_compile --dtypes bfloat16 --head-dims 64/64 --arch 90   # one custom suite

Triton's internals are used where a launch uses them (JITFunction.warmup, the
autotuner's pruning, the active driver); where this Triton lacks one, the module
exits with MISSING_INTERNALS_EXIT and the tests skip with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Largest dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# the limit Triton checks at launch: A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
# Exit status when this Triton lacks an internal the check drives (the tests skip then).
MISSING_INTERNALS_EXIT = 3


@dataclass(frozen=True)
class CompileCase:
    """One forward + backward call of the launchers."""

    dtype: str
    head_dim_qk: int
    head_dim_v: int
    num_queries: int
    num_keys: int
    masked: bool = True
    residual: bool = True
    causal: bool = False
    variant: str = "timed"  # of perceiver_kernels/triton/variants.py
    backward: bool = True  # the backward call too
    tf32: bool = False  # float32 with torch.backends.cuda.matmul.allow_tf32

    @property
    def label(self) -> str:
        shape = "encode" if self.num_keys > self.num_queries else "decode"
        extras = "".join(("+mask" if self.masked else "", "+residual" if self.residual else "",
                          "+causal" if self.causal else "", "+untimed" if self.variant == "untimed" else "",
                          "+tf32" if self.tf32 else ""))
        return f"{self.dtype} {self.head_dim_qk}/{self.head_dim_v} {shape} {self.num_queries}x{self.num_keys}{extras}"


HEAD_DIMS = ((16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (32, 160))
# The wide kernels (above 256): rows not 16-byte aligned (261, the most registers), Dv in
# ten forward slices (32/1280), both wide and aligned (512/512), a narrow Dv (1280/24).
WIDE_HEAD_DIMS = ((261, 261), (32, 1280), (512, 512), (1280, 24))
# Wide heads stored at a multiple of 16 channels (perceiver/padding.py).
ALIGNED_WIDE_HEAD_DIMS = ((272, 272), (336, 336), (512, 256))
ARCHS = (80, 90)
# (Nq, Nk) of a suite's cases: ENCODE and DECODE with 128 latents.
SHAPES = ((128, 4096), (4096, 128))
# The untimed ENCODE/DECODE backward keeps all of the short side resident: the
# benchmark's 256 latents (one tile of 256 rows) and 64 (a tile of 64 rows, 4 warps).
RESIDENT_SHAPES = ((256, 4096), (4096, 256), (64, 4096), (4096, 64))


@dataclass(frozen=True)
class Suite:
    """Cases compiled for some architectures, with their table configs or (tuned) every
    config autotuning would try."""

    dtypes: tuple[str, ...]
    head_dims: tuple[tuple[int, int], ...]
    causal: tuple[bool, ...] = (False,)
    archs: tuple[int, ...] = ARCHS
    tuned: bool = False
    flags: tuple[tuple[bool, bool], ...] = ((True, True),)  # (masked, residual)
    variant: str = "timed"
    shapes: tuple[tuple[int, int], ...] = SHAPES
    backward: bool = True
    tf32: bool = False

    def cases(self) -> list["CompileCase"]:
        return [CompileCase(dtype, dqk, dv, num_queries, num_keys, masked, residual, causal, self.variant,
                            self.backward, self.tf32)
                for dtype in self.dtypes for dqk, dv in self.head_dims for masked, residual in self.flags
                for num_queries, num_keys in self.shapes for causal in self.causal]


SUITES = {
    # Every narrow head dim with its table config, ENCODE and DECODE. bf16 stands for 16
    # bits here and in every suite: of the 88 launch classes compiled in both (triton 3.9,
    # 2026-12-03), 85 took the same registers, shared memory and wgmma in fp16 and bf16,
    # and 3 took more registers in bf16, the stricter case for spills.
    "table": Suite(("bfloat16", "float32"), HEAD_DIMS),
    # The causal launches (their non-causal twins are the table's).
    "causal": Suite(("bfloat16", "float32"), ((64, 64), (32, 160)), causal=(True,)),
    # The wide kernels, causal or not.
    "wide": Suite(("bfloat16", "float32"), WIDE_HEAD_DIMS),
    "wide-causal": Suite(("bfloat16", "float32"), ((261, 261),), causal=(True,)),
    # Every config autotuning would try on the anchor, for Hopper.
    "tuned": Suite(("bfloat16",), ((64, 64),), archs=(90,), tuned=True),
    # The rewrites no GPU has timed yet, where they serve (compile_units leaves out the
    # timed kernels' launches); bf16 stands for 16 bits.
    "untimed": Suite(("bfloat16", "float32"), ((32, 32), (64, 64), (128, 128), (256, 256), (32, 160))
                     + WIDE_HEAD_DIMS, causal=(False, True), variant="untimed"),
    # The persistent DECODE forward (untimed, 16 bits) at the key counts its single key
    # block serves beyond the untimed suite's 128: 256 keys, and 64 (a block narrower
    # than the head dims), with and without mask and residual, causal or not; forward
    # launches only, on sm_90 (the untimed suite shows it declines sm_80 and float32).
    "decode": Suite(("bfloat16",), HEAD_DIMS + ((40, 24), (48, 48)), causal=(False, True), archs=(90,),
                    flags=((True, True), (False, False)), variant="untimed", shapes=((4096, 64), (4096, 256)),
                    backward=False),
    # The untimed ENCODE kernel (triton/encode.py) where the untimed cases do not reach
    # it (their exact fp32 and wide-head programs already take all the rows they can):
    # 256 latents in one program, split (this machine counts 4 SMs, so 2 heads of one
    # program each take splits), with a mask (two key loops) and without (one loop,
    # warp-specialized on sm_90); 1,024 latents in four programs per head, unsplit.
    "encode": Suite(("bfloat16",), ((64, 64), (128, 128), (256, 256)), causal=(False, True),
                    flags=((True, True), (False, False)), variant="untimed", shapes=((256, 8192),)),
    "encode-unsplit": Suite(("bfloat16",), ((64, 64),), causal=(False, True), flags=((True, True), (False, False)),
                            variant="untimed", shapes=((1024, 8192),)),
    # The untimed ENCODE/DECODE backward's other resident tiles (the "untimed" suite's
    # 128 latents give its 128-row tile).
    "untimed-resident": Suite(("bfloat16", "float32"), ((32, 32), (64, 64), (128, 128), (32, 160)),
                              causal=(False, True), variant="untimed", shapes=RESIDENT_SHAPES),
    # The untimed wide forward on the head dims the perceiver model layer stores (the
    # released models' 261 and 322 padded to 272 and 336), which it reads by TMA on
    # sm_90, and Dqk != Dv (the untimed suite has 512/512: Dv in two slices), with and
    # without mask and residual (its tiles depend on the mask), and 64 queries (its
    # one-warpgroup tiles); forward only (the backward is the timed one, compiled by the
    # wide suite).
    "untimed-wide": Suite(("bfloat16", "float32"), ALIGNED_WIDE_HEAD_DIMS, causal=(False, True), variant="untimed",
                          flags=((True, True), (False, False)), backward=False,
                          shapes=((128, 4096), (4096, 128), (64, 4096))),
    # Its TF32 tiles (float32 with TF32 allowed), where they serve.
    "untimed-wide-tf32": Suite(("float32",), ((272, 272),), causal=(False, True), variant="untimed",
                               flags=((True, True), (False, False)), backward=False, tf32=True,
                               shapes=((128, 4096), (4096, 128), (64, 4096))),
}


class _Recorder:
    """Takes a kernel's place in the launchers: `kernel[grid](*args, **kwargs)` is recorded, not run."""

    def __init__(self, kernel, launches: list):
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(case: CompileCase, allow_tf32: bool = False, arch: int | None = None,
                    split_timed_encode: bool = True) -> list[tuple]:
    """(kernel, args, kwargs) of every launch of one forward and one backward call.

    The launches take the configs the launchers choose for a GPU of compute capability
    `arch` (its shared memory included), or for the interpreter when arch is None. A
    timed ENCODE case is forced to split (so the split and merge kernels are compiled
    whatever the tiles) unless `split_timed_encode` is False.
    """
    from perceiver_kernels.triton import backward, configs, forward, variants
    from tests.kernel_runners import kernel_call

    dtype = getattr(torch, case.dtype)
    batch, heads = 1, 2
    # Values do not matter (nothing runs), only shapes, dtypes and strides: empty tensors.
    inputs = dict(
        q=torch.empty(batch, heads, case.num_queries, case.head_dim_qk, dtype=dtype),
        k=torch.empty(batch, heads, case.num_keys, case.head_dim_qk, dtype=dtype),
        v=torch.empty(batch, heads, case.num_keys, case.head_dim_v, dtype=dtype),
        key_padding_mask=torch.zeros(batch, case.num_keys, dtype=torch.bool) if case.masked else None,
        residual=torch.empty(batch, heads, case.num_queries, case.head_dim_v, dtype=dtype) if case.residual else None,
        scale=None, causal=case.causal,
    )
    call = kernel_call(inputs, allow_tf32 or case.tf32)

    launches: list = []
    originals = [(module, name, getattr(module, name)) for name, module in configs.MODULES.items()]
    settings = [(configs, "AUTOTUNE", configs.AUTOTUNE), (configs, "device_facts", configs.device_facts)]

    def clear_caches():
        for cached in (configs.choose, forward.plan_forward, backward.plan_backward):
            cached.cache_clear()

    try:
        for module, name, kernel in originals:
            setattr(module, name, _Recorder(kernel, launches))
        configs.AUTOTUNE = False  # the table's config is recorded; a tuned suite adds the tuning space
        if arch is not None:
            facts = (f"sm_{arch}", SHARED_MEMORY_LIMIT[arch])
            configs.device_facts = lambda device: facts
        clear_caches()
        with variants.running(case.variant):
            timed_split = split_timed_encode and case.num_keys > case.num_queries and case.variant == variants.TIMED
            out, lse = forward.run_forward(call, num_splits=3 if timed_split else None)
            if case.backward:
                backward.run_backward(call.without_residual(), torch.empty_like(out), out, lse)
    finally:
        for module, name, original in originals + settings:
            setattr(module, name, original)
        clear_caches()
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


def _configs_to_try(kernel, args, kwargs, arch: int, tuned: bool) -> list[dict]:
    """The launch's own config, or (tuned) every config the autotuner would try for it
    (the tuning space pruned for this shape class and target)."""
    from perceiver_kernels.triton import configs

    name = kernel.__name__
    if not tuned or name not in configs.SEARCH_SPACES:
        return [{}]
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    shape = configs.shape_class(name, named)
    device_facts = configs.device_facts
    try:
        configs.device_facts = lambda device: (f"sm_{arch}", SHARED_MEMORY_LIMIT[arch])
        space = configs.search_space(shape, torch.device("cpu"))
    finally:
        configs.device_facts = device_facts
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
    problems: list[str]  # the labels of the cases that launch it
    suites: list[str]
    kernel: str
    arch: int
    config: dict
    error: str | None = None
    shared_bytes: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    wgmma: int | None = None  # Hopper warpgroup matrix instructions in the PTX
    tma: int | None = None  # tensor-memory-accelerator copies (cp.async.bulk.tensor) in the PTX
    warp_specialized: bool | None = None  # the TTGIR holds ttg.warp_specialize
    # Register tensors stored to shared memory (ttg.local_alloc of a value) inside the
    # innermost loops that hold dots: 0 when loop-invariant dot operands (the DECODE
    # kernel's K and V) are stored once, outside the loop that uses them.
    dot_loop_stores: int | None = None
    grid_dependency: int | None = None  # griddepcontrol instructions (programmatic dependent launch) in the PTX
    # Products left as tt.dot in the TTGIR: on sm_90, those that did not become wgmma
    # (ttng.warp_group_dot) but mma.sync or FMA.
    dots_off_wgmma: int | None = None


def _specialization(value) -> tuple:
    """What Triton specializes a launch argument on: a tensor's dtype, an int's being 1 or
    a multiple of 16 (in a tuple too); other values as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype))
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", value == 1, value % 16 == 0)
    if isinstance(value, tuple):  # a tensor's strides: each element specialized as an int
        return ("tuple", *(_specialization(element) for element in value))
    if isinstance(value, float):
        return ("float",)
    if hasattr(value, "base") and hasattr(value, "block_shape"):  # a host-side TensorDescriptor
        return ("descriptor", str(value.base.dtype), tuple(value.block_shape),
                tuple(_specialization(stride)[1:] for stride in value.strides))
    return (repr(value),)


@dataclass
class CompileUnit:
    """One kernel compile: a launch's kernel, arguments and config, for one architecture,
    and every case and suite that launches it so."""

    kernel: object
    args: tuple
    kwargs: dict
    arch: int
    config: dict
    problems: list[str]
    suites: list[str]


def _key(kernel, args, launch: dict, arch: int) -> tuple:
    return kernel.__name__, arch, tuple(sorted(launch.items())), tuple(_specialization(a) for a in args)


def compile_units(suites: dict[str, Suite]) -> list[CompileUnit]:
    """The distinct compiles of every suite's launches, in a fixed order. An untimed suite
    keeps only the rewrites' launches: those the same case makes with the switch on
    "timed" (where no rewrite serves it) are the timed suites' to check."""
    units: dict[tuple, CompileUnit] = {}
    for suite_name, suite in suites.items():
        for case in suite.cases():
            for arch in suite.archs:
                timed = set()
                if case.variant != "timed":
                    timed = {_key(kernel, args, kwargs, arch) for kernel, args, kwargs in record_launches(
                        dataclasses.replace(case, variant="timed"), arch=arch, split_timed_encode=False)}
                for kernel, args, kwargs in record_launches(case, arch=arch):
                    if _key(kernel, args, kwargs, arch) in timed:
                        continue
                    for config in _configs_to_try(kernel, args, kwargs, arch, suite.tuned):
                        launch = {**kwargs, **config}
                        key = _key(kernel, args, launch, arch)
                        unit = units.setdefault(key, CompileUnit(kernel, args, launch, arch, config, [], []))
                        if case.label not in unit.problems:
                            unit.problems.append(case.label)
                        if suite_name not in unit.suites:
                            unit.suites.append(suite_name)
    return list(units.values())


def compile_unit(unit: CompileUnit) -> CompileRecord:
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    jit_function = unit.kernel if isinstance(unit.kernel, JITFunction) else unit.kernel.fn  # an autotuner wraps one
    # This process only compiles, so the stand-in is never swapped back.
    driver.set_active(_CompileOnlyDriver(unit.arch))
    record = CompileRecord(unit.problems, unit.suites, jit_function.__name__, unit.arch,
                           {key: value for key, value in unit.kwargs.items()
                            if key in ("BLOCK_M", "BLOCK_N", "BLOCK_INNER", "BLOCK_RESIDENT", "num_warps",
                                       "num_stages")})
    try:
        compiled = jit_function.warmup(*unit.args, grid=(1,), **unit.kwargs)
    except Exception as error:  # noqa: BLE001 (every compile failure is a finding)
        record.error = f"{type(error).__name__}: {error}"[:2000]
    else:
        record.shared_bytes = compiled.metadata.shared
        usage = _resource_usage(compiled.asm["cubin"])
        record.registers, record.stack_bytes = usage.get("reg"), usage.get("stack")
        record.local_bytes = usage.get("local")
        record.wgmma = compiled.asm["ptx"].count("wgmma.mma_async")
        record.tma = compiled.asm["ptx"].count("cp.async.bulk.tensor")
        record.warp_specialized = "ttg.warp_specialize" in compiled.asm.get("ttgir", "")
        record.dot_loop_stores = dot_loop_stores(compiled.asm.get("ttgir", ""))
        record.grid_dependency = compiled.asm["ptx"].count("griddepcontrol")
        record.dots_off_wgmma = compiled.asm.get("ttgir", "").count(" tt.dot ")
    return record


def dot_loop_stores(ttgir: str) -> int:
    """ttg.local_alloc ops with an operand (a register tensor stored to shared memory)
    inside the innermost scf.for loops that hold a dot, read from the TTGIR's nesting
    (each op on its own line, a region's body indented deeper than its opening line)."""
    lines = ttgir.splitlines()
    stores = 0
    for start, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[start + 1:]:
            if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                break
            body.append(inner)
        innermost = not any("scf.for" in inner for inner in body)
        if innermost and any("tt.dot " in inner or "warp_group_dot " in inner for inner in body):
            stores += sum("ttg.local_alloc %" in inner for inner in body)
    return stores


def compile_launch(kernel, args, kwargs, arch: int, case: CompileCase) -> CompileRecord:
    """The record of compiling one launch (a kernel of any module) for one architecture."""
    return compile_unit(CompileUnit(kernel, args, kwargs, arch, {}, [case.label], ["custom"]))


def _triton_version() -> str:
    import triton

    return triton.__version__


def _missing_internals() -> str | None:
    from triton.runtime import driver, jit

    needs = ((jit.JITFunction, "warmup"), (driver, "set_active"))
    missing = [f"{getattr(owner, '__name__', 'driver')}.{name}" for owner, name in needs if not hasattr(owner, name)]
    return ", ".join(missing) or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.triton_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated suites of {list(SUITES)}")
    parser.add_argument("--dtypes", help="a custom suite instead: comma-separated torch dtypes")
    parser.add_argument("--head-dims", default=",".join(f"{a}/{b}" for a, b in HEAD_DIMS),
                        help="the custom suite's comma-separated Dqk/Dv pairs")
    parser.add_argument("--both-flags", action="store_true",
                        help="the custom suite also without mask and residual (default: both on)")
    parser.add_argument("--causal", action="store_true", help="the custom suite's causal launches too")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="the custom suite's compute capabilities")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th unit from the i-th")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 makes the kernels interpreted: unset it")
    shard, shards = (int(part) for part in args.shard.split("/"))
    missing = _missing_internals()
    if missing:
        print(f"this Triton ({_triton_version()}) lacks {missing}, which the compile check drives", file=sys.stderr)
        sys.exit(MISSING_INTERNALS_EXIT)

    if args.dtypes:
        head_dims = tuple(tuple(int(d) for d in pair.split("/")) for pair in args.head_dims.split(","))
        flags = ((True, True), (False, False)) if args.both_flags else ((True, True),)
        suites = {"custom": Suite(tuple(args.dtypes.split(",")), head_dims, (False, True) if args.causal else (False,),
                                  tuple(int(a) for a in args.arch.split(",")), flags=flags)}
    else:
        unknown = set(args.suites.split(",")) - set(SUITES)
        if unknown:
            parser.error(f"unknown suites {sorted(unknown)}; the suites are {list(SUITES)}")
        suites = {name: SUITES[name] for name in args.suites.split(",")}
    for index, unit in enumerate(compile_units(suites)):
        if index % shards == shard:
            print(json.dumps(asdict(compile_unit(unit))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
