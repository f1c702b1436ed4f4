"""Launch configurations of the Triton kernels: measured per GPU architecture, a
heuristic for the rest, and autotuning only on request; and the kernels by name.

By default every launch takes its config (tile sizes, warps, pipeline stages) from
MEASURED, the winners of autotuning on a GPU for the shape classes that were tuned
there, or else from the first entry of PREFERENCES that fits: no key block longer than
the keys a program walks, tiles that compile without spilling (tests/triton_compile.py)
and shared memory within the device's limit. A new shape class then costs one compile
(a second or two on a GPU) instead of timing dozens of configs (15-35 s on an H200).

PERCEIVER_KERNELS_AUTOTUNE=1 makes the launchers go through triton.autotune over
SEARCH_SPACES (pruned by the same rules) with cache_results=True: the winners persist in
Triton's cache directory and later processes reuse them. Read once, at import.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import machine
from ..kernel_launch import next_power_of_2
from ..problem import Problem
from .kernels import (attention_bwd, attention_bwd_resident, attention_bwd_wide, attention_fwd,
                      attention_fwd_wide, decode_fwd, encode_fwd, wide_fwd)

AUTOTUNE = os.environ.get("PERCEIVER_KERNELS_AUTOTUNE", "0") == "1"

# The kernels, by the names the launchers and the compile check use.
FORWARD_TILE = "attention_fwd_kernel"
FORWARD_SPLIT = "attention_fwd_split_kernel"
MERGE = "merge_splits_kernel"
BACKWARD_DELTA = "attention_bwd_delta_kernel"
BACKWARD_DKDV = "attention_bwd_dkdv_kernel"
BACKWARD_DQ = "attention_bwd_dq_kernel"
# Head dims above 256: chunked head-dim sums, one program per slice of the output's
# channels (kernels/attention_fwd_wide.py, kernels/attention_bwd_wide.py).
FORWARD_WIDE_TILE = "attention_fwd_wide_kernel"
FORWARD_WIDE_SPLIT = "attention_fwd_wide_split_kernel"
BACKWARD_WIDE_DELTA = "attention_bwd_wide_delta_kernel"
BACKWARD_WIDE_DKDV = "attention_bwd_wide_dkdv_kernel"
BACKWARD_WIDE_DQ = "attention_bwd_wide_dq_kernel"
# Untimed rewrites (variants.py): the persistent DECODE forward (triton/decode.py), and
# the ENCODE forward holding all the latents of a head (kernels/encode_fwd.py, launched by
# triton/encode.py; its merge is MERGE).
DECODE_FORWARD = "decode_fwd_kernel"
ENCODE_FORWARD = "encode_fwd_kernel"
# The ENCODE/DECODE backward in five products with the short side resident, and the sum
# of its partials (kernels/attention_bwd_resident.py; an untimed rewrite, fixed launch
# configs in triton/resident_backward.py).
BACKWARD_ENCODE = "attention_bwd_encode_kernel"
BACKWARD_DECODE = "attention_bwd_decode_kernel"
SUM_CHUNKS = "sum_chunks_kernel"
# Untimed (variants.py): wide heads up to 512 channels with each score computed once, one
# program per (slice of Dv, query tile, key chunk) (kernels/wide_fwd.py, launched by
# triton/wide.py with its own tiles).
FORWARD_WIDE_ONCE = "wide_fwd_kernel"
FORWARDS = (FORWARD_TILE, FORWARD_SPLIT, FORWARD_WIDE_TILE, FORWARD_WIDE_SPLIT)
BACKWARDS = (BACKWARD_DKDV, BACKWARD_DQ, BACKWARD_WIDE_DKDV, BACKWARD_WIDE_DQ)
WIDE = (FORWARD_WIDE_TILE, FORWARD_WIDE_SPLIT, BACKWARD_WIDE_DKDV, BACKWARD_WIDE_DQ)
# The kernels whose programs' rows come from the plan, not from the config.
SPLITS = (FORWARD_SPLIT, FORWARD_WIDE_SPLIT)
# Where each kernel lives. Looked up at launch (kernel()), not bound at import, so that
# tests/triton_compile.py can put recorders in the kernels' place.
MODULES = {
    FORWARD_TILE: attention_fwd, FORWARD_SPLIT: attention_fwd, MERGE: attention_fwd,
    FORWARD_WIDE_TILE: attention_fwd_wide, FORWARD_WIDE_SPLIT: attention_fwd_wide,
    BACKWARD_DELTA: attention_bwd, BACKWARD_DKDV: attention_bwd, BACKWARD_DQ: attention_bwd,
    BACKWARD_WIDE_DELTA: attention_bwd_wide, BACKWARD_WIDE_DKDV: attention_bwd_wide,
    BACKWARD_WIDE_DQ: attention_bwd_wide,
    DECODE_FORWARD: decode_fwd,
    ENCODE_FORWARD: encode_fwd,
    BACKWARD_ENCODE: attention_bwd_resident, BACKWARD_DECODE: attention_bwd_resident,
    SUM_CHUNKS: attention_bwd_resident,
    FORWARD_WIDE_ONCE: wide_fwd,
}
# The meta-parameter each kernel walks its summed dimension with.
INNER_BLOCK = {**{kernel: "BLOCK_N" for kernel in FORWARDS}, **{kernel: "BLOCK_INNER" for kernel in BACKWARDS}}


@dataclass(frozen=True)
class LaunchConfig:
    inner: int            # BLOCK_N (forward) or BLOCK_INNER (backward)
    num_warps: int
    num_stages: int
    block_m: Optional[int] = None  # the tile kernel's query rows; the others get theirs from the plan

    def kwargs(self, kernel: str) -> dict:
        meta = {INNER_BLOCK[kernel]: self.inner, "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.block_m is not None:
            meta["BLOCK_M"] = self.block_m
        return meta


@dataclass(frozen=True)
class ShapeClass:
    """What a config depends on: the blocks a launch gets and the rows its programs walk.

    For the wide kernels, block_dqk is the chunk of the sums over Dqk (BLOCK_CHUNK_QK)
    and block_dv the slice of channels each program writes (BLOCK_SLICE).
    """

    kernel: str
    block_dqk: int
    block_dv: int
    exact_fp32: bool  # fp32 without TF32: dots on CUDA cores with operands in registers
    element_bytes: int
    inner_length: int  # keys (forward, dQ) or queries (dK/dV) one program walks
    block_m: Optional[int] = None  # rows per program fixed by the launcher (split, backward)

    @property
    def wide_head(self) -> bool:
        return max(self.block_dqk, self.block_dv) > 128

    @property
    def accumulator_channels(self) -> int:
        """Channels of the fp32 accumulators a backward program keeps, as the register
        estimate counts them: Dqk + Dv for the narrow kernels (calibrated so), a slice of
        dK and one of dV for the wide dK/dV kernel, a slice of dQ for the wide dQ kernel."""
        if self.kernel == BACKWARD_WIDE_DKDV:
            return 2 * self.block_dv
        if self.kernel == BACKWARD_WIDE_DQ:
            return self.block_dv
        return self.block_dqk + self.block_dv


def _c(inner, warps, stages, block_m=None) -> LaunchConfig:
    return LaunchConfig(inner, warps, stages, block_m)


# Winners of autotuning (triton 3.6 on an H200, bf16, head dims 64/64; tuned.txt of
# benchmarks/results/2026-11-30-h200): DEC-1's tile forward, ENC-1/ENC-3's split forward
# (4 stages won ENC-3 and 3 ENC-1).
MEASURED: dict[tuple, LaunchConfig] = {
    ("sm_90", FORWARD_TILE, 64, 64): _c(64, 4, 4, block_m=128),
    ("sm_90", FORWARD_SPLIT, 64, 64): _c(64, 8, 4),
}

# Ordered by preference; the first that fits a shape class runs. The narrow 16-bit
# entries start from the measured winners; wide heads and exact fp32 from the tiles the
# compile check found free of spills.
# Short ranges, wide heads, exact fp32.
_SMALL = (_c(32, 4, 1), _c(32, 8, 2), _c(32, 8, 1), _c(16, 4, 1), _c(16, 8, 2), _c(16, 8, 1))
PREFERENCES: dict[str, tuple[LaunchConfig, ...]] = {
    FORWARD_TILE: (_c(64, 4, 4, 128), _c(64, 4, 3, 64), _c(64, 4, 2, 64), _c(32, 4, 2, 64), _c(32, 8, 2, 64),
                   _c(16, 8, 1, 64), *(LaunchConfig(c.inner, c.num_warps, c.num_stages, 32) for c in _SMALL),
                   _c(16, 8, 1, 16)),
    FORWARD_SPLIT: (_c(64, 8, 4), _c(64, 8, 3), _c(64, 4, 2), _c(32, 8, 2), _c(32, 4, 2), *_SMALL),
    BACKWARD_DKDV: (_c(64, 4, 2), _c(32, 4, 2), _c(32, 8, 2), *_SMALL),
    BACKWARD_DQ: (_c(64, 4, 2), _c(32, 4, 2), _c(32, 8, 2), *_SMALL),
    # Wide heads (tiling.WIDE_*): forward tiles of 64 rows over 32 keys (exact fp32:
    # 16 rows over 16; 32 rows spilled on sm_80 in 1 stage or 2, depending on the head
    # dim); the backward walks 16 rows at a time (32 spilled at 261 channels).
    FORWARD_WIDE_TILE: (_c(32, 8, 2, 64), _c(16, 8, 1, 16)),
    FORWARD_WIDE_SPLIT: (_c(32, 8, 2), _c(16, 8, 1)),
    BACKWARD_WIDE_DKDV: (_c(16, 8, 1),),
    BACKWARD_WIDE_DQ: (_c(16, 8, 2), _c(16, 8, 1)),
    # Its rows come from the plan (triton/encode.py: all the latents, up to what fits).
    ENCODE_FORWARD: (_c(64, 8, 3), _c(64, 8, 2), _c(64, 4, 3), _c(64, 4, 2), _c(32, 8, 2), _c(32, 4, 2), *_SMALL),
}
# The interpreter runs in numpy: configs only change its speed and how many blocks a
# test walks, so it takes small query tiles (more programs, more edges tested).
INTERPRETER_TILE_ROWS = 32

SEARCH_SPACES: dict[str, tuple[LaunchConfig, ...]] = {
    FORWARD_TILE: tuple(_c(n, w, s, m) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)),
    FORWARD_SPLIT: tuple(_c(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)),
    BACKWARD_DKDV: tuple(_c(n, w, s) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2)),
    BACKWARD_DQ: tuple(_c(n, w, s) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2)),
    FORWARD_WIDE_TILE: tuple(_c(n, w, s, m) for m in (32, 64) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2)),
    FORWARD_WIDE_SPLIT: tuple(_c(n, w, s) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2)),
    BACKWARD_WIDE_DKDV: tuple(_c(n, w, s) for n in (16, 32) for w in (4, 8) for s in (1, 2)),
    BACKWARD_WIDE_DQ: tuple(_c(n, w, s) for n in (16, 32) for w in (4, 8) for s in (1, 2)),
}


def shared_memory_bytes(config: LaunchConfig, shape: ShapeClass) -> int:
    """An upper estimate of a launch's shared memory: the stationary tile plus `stages`
    buffers of the streamed K/V (forward) or Q/dO (backward) blocks."""
    rows = config.block_m or shape.block_m or 64
    stationary = rows * (shape.block_dqk + shape.block_dv)
    streamed = max(1, config.num_stages) * config.inner * (shape.block_dqk + shape.block_dv)
    return (stationary + streamed) * shape.element_bytes


def _register_budget_exceeded(config: LaunchConfig, shape: ShapeClass, arch: str) -> bool:
    """Whether the live tiles of a launch outgrow the registers, by estimates calibrated
    on ptxas's reports for sm_80 and sm_90 (tests/triton_compile.py), per thread:

    - forward on tensor cores: the fp32 accumulator and score tile, rows x (Dv + inner)
      / threads, within 128 on sm_90 (wgmma keeps operands in shared memory; the
      measured head-dim-64 winners sit at 128) and 64 before it (mma.sync holds them);
    - forward in exact fp32 (dots on CUDA cores): rows x inner x (Dqk + Dv) / threads
      within 1024;
    - backward on tensor cores: the accumulators (ShapeClass.accumulator_channels: two as
      wide as the heads, or the wide kernels' slices) plus two score tiles, rows x
      (channels + 2 inner) / threads, within 160 on sm_90 (192 spilled at head dim 128)
      and 96 before.

    For the wide kernels Dqk and Dv read as their chunk and slice (ShapeClass).
    """
    rows = config.block_m or shape.block_m or 64
    threads = 32 * config.num_warps
    hopper = machine.capability(arch) >= 90
    if shape.kernel in BACKWARDS:
        if shape.exact_fp32:
            return False
        return rows * (shape.accumulator_channels + 2 * config.inner) / threads > (160 if hopper else 96)
    if shape.exact_fp32:
        return rows * config.inner * (shape.block_dqk + shape.block_dv) / threads > 1024
    return rows * (shape.block_dv + config.inner) / threads > (128 if hopper else 64)


def fits(config: LaunchConfig, shape: ShapeClass, shared_memory_limit: Optional[int], arch: str = "sm_90") -> bool:
    """The pruning rules (each found by compiling for sm_80/sm_90, see tests/triton_compile.py):

    - an inner block longer than the rows a program walks only multiplies padding;
    - tiles whose registers would spill (_register_budget_exceeded);
    - head dims above 128 (narrow kernels): inner blocks of at most 64 (32 in the
      backward), query tiles of at most 64 rows, at most 2 stages (1 in the backward),
      8 warps in the backward;
    - exact fp32 dots keep both operands in registers: forward inner blocks of at most
      32 (16 in the wide kernels on a GPU: 32 spilled on sm_80), 8 warps everywhere, 1
      stage in the backward and from Dqk + Dv of 256;
    - the wide dQ kernel in 16 bits: 2 stages on sm_90 and 1 before (ptxas held the
      other to 128 registers and spilled 8 bytes);
    - the ENCODE kernel before Hopper, head dims above 128: key tiles of at most 32
      (32 rows over 64 keys spilled 8 bytes on sm_80, 32 and 64 rows over 32 none);
    - shared memory within the device's limit (None: no limit, the interpreter).
    """
    backward = shape.kernel in BACKWARDS
    rows = config.block_m or shape.block_m or 0
    if config.inner > max(16, next_power_of_2(shape.inner_length)):
        return False
    if arch != "interpreter" and _register_budget_exceeded(config, shape, arch):
        return False
    wide = shape.kernel in WIDE
    if shape.kernel == BACKWARD_WIDE_DQ and not shape.exact_fp32 and arch != "interpreter" and (
            config.num_stages != (2 if machine.capability(arch) >= 90 else 1)):
        return False
    if shape.wide_head and not wide and (
            config.inner > (32 if backward else 64) or rows > 64 or config.num_stages > (1 if backward else 2)
            or (backward and config.num_warps < 8)):
        return False
    if (shape.kernel == ENCODE_FORWARD and shape.wide_head and arch != "interpreter"
            and machine.capability(arch) < 90 and config.inner > 32):
        return False
    longest_exact = 16 if wide and arch != "interpreter" else 32
    if shape.exact_fp32 and (config.num_warps < 8 or (not backward and config.inner > longest_exact) or (
            config.num_stages > 1 and (backward or shape.block_dqk + shape.block_dv >= 256))):
        return False
    if shared_memory_limit is not None and shared_memory_bytes(config, shape) > shared_memory_limit:
        return False
    return True


def device_facts(device: torch.device) -> tuple[str, Optional[int]]:
    """("sm_XY", opt-in shared memory per block) of a GPU; ("interpreter", None) on the CPU."""
    architecture = machine.architecture(device.type, device.index)
    limit = machine.shared_memory_per_block(device.type, device.index)
    return architecture, limit or None


def first_fit(shape: ShapeClass, device: torch.device) -> Optional[LaunchConfig]:
    """The first config of PREFERENCES that fits a shape class on a device, or None (a
    launcher that can take fewer rows per program then tries those)."""
    arch, limit = device_facts(device)
    return next((config for config in PREFERENCES[shape.kernel] if fits(config, shape, limit, arch)), None)


@functools.lru_cache(maxsize=4096)
def choose(shape: ShapeClass, device: torch.device) -> LaunchConfig:
    """The config a launch of this shape class takes without autotuning."""
    arch, limit = device_facts(device)
    if arch == machine.INTERPRETER:
        for config in PREFERENCES[shape.kernel]:
            if fits(config, shape, None, arch):
                tile_rows = INTERPRETER_TILE_ROWS if config.block_m else None
                return LaunchConfig(config.inner, config.num_warps, config.num_stages, tile_rows)
    measured = MEASURED.get((arch, shape.kernel, shape.block_dqk, shape.block_dv))
    if measured is not None and not shape.exact_fp32 and fits(measured, shape, limit, arch):
        return measured
    return first_fit(shape, device) or min(PREFERENCES[shape.kernel], key=lambda c: shared_memory_bytes(c, shape))


def search_space(shape: ShapeClass, device: torch.device) -> list[LaunchConfig]:
    """What autotuning tries for this shape class: the search space, pruned."""
    arch, limit = device_facts(device)
    space = [config for config in SEARCH_SPACES[shape.kernel] if fits(config, shape, limit, arch)]
    return space or [choose(shape, device)]


def head_dim_block_names(kernel: str) -> tuple[str, str]:
    """The constexprs a kernel's ShapeClass.block_dqk and block_dv come from."""
    return ("BLOCK_CHUNK_QK", "BLOCK_SLICE") if kernel in WIDE else ("BLOCK_DQK", "BLOCK_DV")


def shape_class(kernel: str, args: dict) -> ShapeClass:
    """The shape class of a launch, from its named arguments (as the autotuner sees them)."""
    block_dqk, block_dv = head_dim_block_names(kernel)
    return ShapeClass(kernel, args[block_dqk], args[block_dv], args["DOT_PRECISION"] == "ieee",
                      args["Q"].element_size(), args["tuning_inner_length"],
                      args.get("BLOCK_M") if kernel in SPLITS else args.get("BLOCK_OUTER"))


def _tuning_key(kernel: str) -> list[str]:
    outer = ["BLOCK_M"] if kernel in SPLITS else ["BLOCK_OUTER"] if kernel in BACKWARDS else []
    length = "tuning_inner_length"
    wide_backward = ["BLOCK_CHUNK_V"] if kernel in WIDE and kernel in BACKWARDS else []
    return [*head_dim_block_names(kernel), *wide_backward, length, "HAS_MASK", "DOT_PRECISION", *outer] + (
        ["HAS_RESIDUAL"] if kernel in FORWARDS else [])


@functools.lru_cache(maxsize=None)
def autotuned(kernel):
    """`kernel` (a @triton.jit function) behind triton.autotune with results kept on disk."""
    import triton

    name = kernel.__name__

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = {(c.inner, c.num_warps, c.num_stages, c.block_m)
                for c in search_space(shape_class(name, args), args["Q"].device)}
        return [c for c in configs if (c.kwargs[INNER_BLOCK[name]], c.num_warps, c.num_stages,
                                       c.kwargs.get("BLOCK_M")) in kept] or configs[:1]

    configs = []
    for config in SEARCH_SPACES[name]:
        meta = {INNER_BLOCK[name]: config.inner, **({"BLOCK_M": config.block_m} if config.block_m else {})}
        configs.append(triton.Config(meta, num_warps=config.num_warps, num_stages=config.num_stages))
    return triton.autotune(configs=configs, key=_tuning_key(name), prune_configs_by={"early_config_prune": prune},
                           cache_results=True)(kernel)


def launch_meta(kernel: str, problem: Problem, constexprs: dict, inner_length: int,
                block_m: Optional[int] = None) -> tuple[dict, Optional[LaunchConfig]]:
    """The launch meta-parameters of one kernel of a problem, and the config they came
    from (None when autotuning chooses at launch)."""
    if AUTOTUNE:
        return {}, None
    block_dqk, block_dv = (constexprs[name] for name in head_dim_block_names(kernel))
    shape = ShapeClass(kernel, block_dqk, block_dv, problem.exact_fp32, problem.dtype.itemsize, inner_length,
                       block_m)
    config = choose(shape, problem.device)
    return config.kwargs(kernel), config


def kernel(name: str):
    """The kernel of that name, behind the autotuner when it is on and the kernel is tuned."""
    jit_function = getattr(MODULES[name], name)
    return autotuned(jit_function) if AUTOTUNE and name in SEARCH_SPACES else jit_function
