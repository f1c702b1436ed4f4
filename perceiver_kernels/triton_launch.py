"""Launchers of the Triton kernels: blocks, split plans, configs, grids, buffers.

Everything a launch decides from the call's signature (shapes, dtype, device, flags)
is computed once per signature and cached (`_forward_launch`, `_backward_launch`), so
a steady-state call only allocates its outputs, gathers pointers and strides, and
launches. Configs come from triton_configs (a measured table, or autotuning on request).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import triton_configs
from .chunking import SplitPlan, cdiv, plan_chunks, plan_splits
from .kernels import attention_bwd, attention_bwd_fused, attention_bwd_wide, attention_fwd, attention_fwd_wide
from .kernels.common import LOG2E
from .problem import allocate_output
from .triton_configs import LaunchConfig, ShapeClass, next_power_of_2


def _query_tile_rows(num_queries: int, block_dqk: int, block_dv: int, exact_fp32: bool) -> int:
    """Query rows per program of the split kernel: all the latents, up to a tile that fits.

    Exact fp32 dots run on CUDA cores with their operands in registers; taller tiles
    than 64 rows (32 from head dims of 128) spill there (sm_80 and sm_90, see
    tests/triton_compile.py and triton_configs._register_budget_exceeded).
    """
    if exact_fp32:
        largest = 32 if max(block_dqk, block_dv) >= 128 else 64
    else:
        largest = 64 if block_dv > 128 else 128
    return max(16, min(largest, next_power_of_2(num_queries)))


def is_exact_fp32(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """fp32 inputs are computed in full precision unless the user allowed TF32, as in PyTorch."""
    return dtype == torch.float32 and not allow_tf32


def head_dim_blocks(head_dim_qk: int, head_dim_v: int, *, tensor_cores: bool) -> tuple[int, int]:
    """(BLOCK_DQK, BLOCK_DV): each head dim padded to a power of two of at least 16.

    On tensor cores a value block narrower than the query/key block is widened to
    it. Triton 3.6 on an H200 computed P @ V wrong for 16-bit BLOCK_DQK > BLOCK_DV
    (40/24: forward error 1.8, then illegal memory accesses) while every other pair,
    fp32 on CUDA cores, and the same call with equal blocks were right; the PTX of
    the failing launch shows correct operand packing, V layout and descriptors, so
    the fault is below what the compile check can see. The kernels of 2026-12-01
    still go wrong without the widening (`python -m tests.repro_chained_dots
    --full-kernel`, benchmarks/results/2026-12-01-h200-run2: out 0.13, dq 0.58, dk
    0.18 relative error in fp16; bf16 faulted), while the two chained dots alone
    compute right: what triggers it needs more of the kernel than that reproducer.
    """
    block_dqk = max(16, next_power_of_2(head_dim_qk))
    block_dv = max(16, next_power_of_2(head_dim_v))
    if tensor_cores and block_dqk > block_dv:
        block_dv = block_dqk
    return block_dqk, block_dv


# The narrow kernels hold q, k, v and their accumulators whole, each head dim padded to
# a power of two; up to 256 channels that fits (tests/triton_compile.py). Wider heads
# take the wide kernels (kernels/attention_fwd_wide.py, attention_bwd_wide.py), whose
# tiles below were chosen with ptxas for sm_80 and sm_90 (no spills, wgmma in the 16-bit
# forward on sm_90) at 261 channels, the worst case: rows of 261 elements are not
# 16-byte aligned, so every element is loaded with its own 64-bit address.
NARROW_MAX_HEAD_DIM = 256
# Head-dim sums go in chunks of up to 64 channels: 261 computes as 320 (chunks of 128
# would make it 384), and each dot still reduces over enough channels for tensor cores.
WIDE_CHUNK = 64
# Forward: 64-row query tiles (16 in exact fp32, whose dots hold their operands in
# registers), each program writing 128 channels of the output (256 spilled at 64 rows;
# 32-row tiles would give up wgmma).
WIDE_FORWARD_SLICE = 128
WIDE_FORWARD_ROWS = 64
WIDE_FORWARD_ROWS_EXACT_FP32 = 16
# Backward: blocks of 32 rows, each program writing 256 channels of dK and of dV (or of
# dQ), walking the other side 16 rows at a time (32 spilled at 261 channels).
WIDE_BACKWARD_SLICE = 256
WIDE_BACKWARD_ROWS = 32
# Merge (rows, channels per program) and Delta (rows, channels per step of its sum).
WIDE_MERGE_BLOCK = (16, 256)
WIDE_DELTA_BLOCK = (16, 128)


def is_wide(head_dim_qk: int, head_dim_v: int) -> bool:
    """Whether the head dims take the wide kernels."""
    return max(head_dim_qk, head_dim_v) > NARROW_MAX_HEAD_DIM


def wide_chunk(head_dim: int) -> int:
    """The chunk of the wide kernels' sums over a head dim: no wider than the dim needs."""
    return max(16, min(WIDE_CHUNK, next_power_of_2(head_dim)))


def plan_triton_forward(
    batch: int, heads: int, num_queries: int, num_keys: int, head_dim_qk: int, head_dim_v: int,
    device: torch.device, num_splits: Optional[int] = None, exact_fp32: bool = False,
) -> SplitPlan:
    """The split plan of the Triton forward (see chunking.plan_chunks); a wide head's
    programs are counted per slice of Dv."""
    if is_wide(head_dim_qk, head_dim_v):
        rows = WIDE_FORWARD_ROWS_EXACT_FP32 if exact_fp32 else WIDE_FORWARD_ROWS
        tile_rows = max(16, min(rows, next_power_of_2(num_queries)))
        programs = cdiv(num_queries, tile_rows) * cdiv(head_dim_v, WIDE_FORWARD_SLICE) * batch * heads
        return SplitPlan(*plan_chunks(programs, num_keys, device, num_splits), tile_rows)
    block_dqk, block_dv = head_dim_blocks(head_dim_qk, head_dim_v, tensor_cores=not exact_fp32)
    tile_rows = _query_tile_rows(num_queries, block_dqk, block_dv, exact_fp32)
    return plan_splits(batch, heads, num_queries, num_keys, tile_rows, device, num_splits)


def describe_head_dims(head_dim_qk: int, head_dim_v: int) -> str:
    """How the kernels tile the head dims, for explain(): "" for narrow heads."""
    if not is_wide(head_dim_qk, head_dim_v):
        return ""
    return (f"wide head {head_dim_qk}/{head_dim_v}: head-dim sums in chunks of up to {WIDE_CHUNK} channels, "
            f"the output in {cdiv(head_dim_v, WIDE_FORWARD_SLICE)} slices of {WIDE_FORWARD_SLICE} channels, each "
            f"program recomputing the scores for its slice")


def _constexprs(head_dim_qk: int, head_dim_v: int, exact_fp32: bool, has_mask: bool) -> dict:
    """The constexprs every kernel takes: the head-dim blocks of the narrow kernels, or
    the chunk of the wide ones' sums over Dqk (forward and backward add their slice)."""
    if is_wide(head_dim_qk, head_dim_v):
        blocks = dict(BLOCK_CHUNK_QK=wide_chunk(head_dim_qk))
    else:
        block_dqk, block_dv = head_dim_blocks(head_dim_qk, head_dim_v, tensor_cores=not exact_fp32)
        blocks = dict(BLOCK_DQK=block_dqk, BLOCK_DV=block_dv)
    return dict(**blocks, DOT_PRECISION="ieee" if exact_fp32 else "tf32",  # tf32 is ignored for 16-bit inputs
                HAS_MASK=has_mask)


def _config(kernel: str, constexprs: dict, element_bytes: int, inner_length: int, device: torch.device,
            block_m: Optional[int] = None) -> tuple[dict, Optional[LaunchConfig]]:
    """The launch meta-parameters of one kernel, and the config they came from (None
    when autotuning chooses at launch)."""
    if triton_configs.AUTOTUNE:
        return {}, None
    block_dqk, block_dv = (constexprs[name] for name in triton_configs.head_dim_block_names(kernel))
    shape = ShapeClass(kernel, block_dqk, block_dv, constexprs["DOT_PRECISION"] == "ieee",
                       element_bytes, inner_length, block_m)
    config = triton_configs.choose(shape, device)
    return config.kwargs(kernel), config


# Where each kernel lives, by name. Looked up at launch (not bound at import) so that
# tests/triton_compile.py can put recorders in the kernels' place.
_KERNEL_MODULES = {
    triton_configs.FORWARD_TILE: attention_fwd, triton_configs.FORWARD_SPLIT: attention_fwd,
    triton_configs.FORWARD_WIDE_TILE: attention_fwd_wide, triton_configs.FORWARD_WIDE_SPLIT: attention_fwd_wide,
    triton_configs.BACKWARD_DKDV: attention_bwd, triton_configs.BACKWARD_DQ: attention_bwd,
    triton_configs.BACKWARD_ENCODE: attention_bwd_fused, triton_configs.BACKWARD_DECODE: attention_bwd_fused,
    triton_configs.BACKWARD_WIDE_DKDV: attention_bwd_wide, triton_configs.BACKWARD_WIDE_DQ: attention_bwd_wide,
    "attention_bwd_delta_kernel": attention_bwd, "attention_bwd_wide_delta_kernel": attention_bwd_wide,
}


def _jit(name: str):
    return getattr(_KERNEL_MODULES[name], name)


def _kernel(name: str):
    """The kernel of that triton_configs name, behind the autotuner when it is on."""
    return triton_configs.autotuned(_jit(name)) if triton_configs.AUTOTUNE else _jit(name)


@dataclass(frozen=True)
class _ForwardLaunch:
    plan: SplitPlan
    constexprs: dict
    kernel: str                # the tile kernel (num_splits == 1) or the split kernel
    kernel_meta: dict          # its config
    grid: Optional[tuple]      # None: autotuning picks BLOCK_M, the grid follows it
    slices: int                # programs per query tile (and key chunk): one per slice of Dv
    merge_rows: int
    merge_block_dv: int        # channels per merge program


@functools.lru_cache(maxsize=4096)
def _forward_launch(batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v, element_bytes, device,
                    exact_fp32, has_mask, has_residual, causal, num_splits) -> _ForwardLaunch:
    plan = plan_triton_forward(batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v, device, num_splits,
                               exact_fp32)
    constexprs = {**_constexprs(head_dim_qk, head_dim_v, exact_fp32, has_mask), "HAS_RESIDUAL": has_residual,
                  "CAUSAL": causal}
    wide = is_wide(head_dim_qk, head_dim_v)
    slices = 1
    if wide:
        constexprs["BLOCK_SLICE"] = WIDE_FORWARD_SLICE
        slices = cdiv(head_dim_v, WIDE_FORWARD_SLICE)
    if plan.num_splits == 1:
        kernel = triton_configs.FORWARD_WIDE_TILE if wide else triton_configs.FORWARD_TILE
        meta, config = _config(kernel, constexprs, element_bytes, num_keys, device)
        grid = (cdiv(num_queries, config.block_m) * slices * batch * heads,) if config else None
    else:
        kernel = triton_configs.FORWARD_WIDE_SPLIT if wide else triton_configs.FORWARD_SPLIT
        tiles = cdiv(num_queries, plan.query_tile_rows)
        meta, _ = _config(kernel, constexprs, element_bytes, plan.keys_per_split, device, plan.query_tile_rows)
        meta = {**meta, "BLOCK_M": plan.query_tile_rows}
        grid = (tiles * slices * plan.num_splits * batch * heads,)
    # The merge holds one fp32 output row per query: 256 channels take 32 rows to stay in
    # registers, and wider heads are merged in slices.
    if wide:
        merge_rows, merge_block_dv = WIDE_MERGE_BLOCK
    else:
        merge_block_dv = constexprs["BLOCK_DV"]
        merge_rows = min(32 if merge_block_dv > 128 else 64, plan.query_tile_rows)
    return _ForwardLaunch(plan, constexprs, kernel, meta, grid, slices, merge_rows, merge_block_dv)


def _device_context(x: torch.Tensor):
    """Triton launches on the current device: make it the tensors' device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def run_triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    allow_tf32: bool,
    num_splits: Optional[int] = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernels on validated inputs; returns (out, lse natural-log)."""
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    launch = _forward_launch(batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v, q.element_size(),
                             q.device, is_exact_fp32(q.dtype, allow_tf32), key_padding_mask is not None,
                             residual is not None, causal, num_splits)
    out, lse = allocate_output(q, head_dim_v)
    # Absent mask or residual: any valid pointer with zero strides; HAS_MASK /
    # HAS_RESIDUAL keep it unread.
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    res = residual if residual is not None else out
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    qk_scale_log2 = scale * LOG2E
    plan = launch.plan

    with _device_context(q):
        if plan.num_splits == 1:
            grid = launch.grid or (lambda meta: (cdiv(num_queries, meta["BLOCK_M"]) * launch.slices * batch * heads,))
            _kernel(launch.kernel)[grid](
                q, k, v, pad, res, out, lse,
                *q.stride(), *k.stride(), *v.stride(), *pad_strides, *res_strides, *out.stride(),
                heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
                next_power_of_2(num_keys),
                **launch.constexprs, **launch.kernel_meta,
            )
            return out, lse

        part_out = torch.empty((batch * heads, plan.num_splits, num_queries, head_dim_v),
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch * heads, plan.num_splits, num_queries), dtype=torch.float32, device=q.device)
        _kernel(launch.kernel)[launch.grid](
            q, k, v, pad, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), *pad_strides,
            heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
            plan.num_splits, plan.keys_per_split,
            next_power_of_2(plan.keys_per_split),
            **launch.constexprs, **launch.kernel_meta,
        )
        merge_programs = cdiv(num_queries, launch.merge_rows) * cdiv(head_dim_v, launch.merge_block_dv)
        attention_fwd.merge_splits_kernel[(merge_programs * batch * heads,)](
            part_out, part_lse, res, out, lse,
            *res_strides, *out.stride(),
            heads, num_queries, head_dim_v, plan.num_splits,
            HAS_RESIDUAL=residual is not None, BLOCK_M=launch.merge_rows, BLOCK_DV=launch.merge_block_dv,
        )
    return out, lse


def _backward_block(block_dqk: int, block_dv: int, exact_fp32: bool) -> int:
    """Rows of what one backward program writes. 64 rows let the dots use Hopper's wgmma
    (whose tiles have 64 rows); the two accumulators need 32 rows to fit registers when
    both heads are wide, and in exact fp32, whose dots hold their operands in registers
    (ptxas for sm_80 and sm_90, tests/triton_compile.py)."""
    return 32 if exact_fp32 or block_dqk + block_dv > 384 else 64


# The backward's kernels: "two-kernel" (the default: the general dK/dV and dQ kernels
# everywhere) or "fused" (PERCEIVER_KERNELS_BACKWARD=fused: one kernel on the asymmetric
# shapes). On the H200 (benchmarks/results/2026-12-01-h200-run1, bf16) the fused one
# lost on every shape it served: forward+backward ENC-1 3.97 against 2.84 ms, ENC-3
# masked 4.78 against 3.55, DEC-1 5.20 against 3.06, DEC-1 with a residual 5.84 against
# 3.70; the benchmark still times both.
BACKWARD_VARIANTS = ("two-kernel", "fused")
DEFAULT_BACKWARD = "two-kernel"


def backward_variant() -> str:
    variant = os.environ.get("PERCEIVER_KERNELS_BACKWARD", DEFAULT_BACKWARD)
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"PERCEIVER_KERNELS_BACKWARD must be one of {BACKWARD_VARIANTS}, got {variant!r}")
    return variant


@dataclass(frozen=True)
class _BackwardKernelLaunch:
    kernel: str  # a name of triton_configs: which kernel, and the config it gets
    chunks: int
    per_chunk: int
    grid: tuple
    meta: dict
    slices: int = 1  # programs per block: the wide kernels' slices of what they write


@dataclass(frozen=True)
class BackwardPlan:
    """How a backward call runs: the fused ENCODE or DECODE kernel, or the two general
    ones (the wide ones for wide heads)."""

    constexprs: dict
    launches: tuple[_BackwardKernelLaunch, ...]
    delta: tuple[str, int, int]  # the Delta kernel, its rows and its block of Dv

    def describe(self) -> str:
        first = self.launches[0]
        if first.kernel == triton_configs.BACKWARD_ENCODE:
            return f"fused ENCODE backward (one pass over K/V in {first.chunks} key chunks, dQ partials summed)"
        if first.kernel == triton_configs.BACKWARD_DECODE:
            return f"fused DECODE backward (one pass over Q in {first.chunks} query chunks, dK/dV partials summed)"
        if first.kernel == triton_configs.BACKWARD_WIDE_DKDV:
            dq = self.launches[1]
            return (f"wide-head two-kernel backward (dK/dV over key blocks in {first.slices} slices, dQ over query "
                    f"blocks in {dq.slices} slices)")
        return "two-kernel backward (dK/dV over key blocks, dQ over query blocks)"


def _delta_launch(head_dim_v: int, block_dv: int) -> tuple[str, int, int]:
    """The Delta kernel, its rows and its block of Dv: all of Dv at once in a block of
    block_dv (32 rows from 256 channels, to stay in registers), or a wide Dv in chunks."""
    if head_dim_v > NARROW_MAX_HEAD_DIM:
        return ("attention_bwd_wide_delta_kernel", *WIDE_DELTA_BLOCK)
    return "attention_bwd_delta_kernel", 32 if block_dv > 128 else 64, block_dv


@functools.lru_cache(maxsize=4096)
def plan_triton_backward(batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v, element_bytes, device,
                         exact_fp32, has_mask, num_chunks=None, variant=DEFAULT_BACKWARD,
                         causal=False) -> BackwardPlan:
    """The general two kernels, which wide heads take in their wide form; with
    variant="fused", the fused kernel where one side fits a program (ENCODE: Nq rows;
    DECODE: Nk rows; triton_configs.FUSED_MAX_INNER says how many) and the other side is
    at least 4x longer, on Hopper and newer (not for causal attention or exact fp32)."""
    constexprs = _constexprs(head_dim_qk, head_dim_v, exact_fp32, has_mask)
    wide = is_wide(head_dim_qk, head_dim_v)
    arch, _ = triton_configs.device_facts(device)
    fused = variant == "fused" and not wide and not exact_fp32 and not causal and (
        arch == "interpreter" or arch >= "sm_90")

    def fits(kernel: str, rows: int) -> bool:
        block_d = max(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"])
        return triton_configs.fused_max_inner(kernel, max(16, next_power_of_2(rows)), block_d) is not None

    if fused and num_keys >= 4 * num_queries and fits(triton_configs.BACKWARD_ENCODE, num_queries):
        kernel, rows, long_side = triton_configs.BACKWARD_ENCODE, num_queries, num_keys
    elif fused and num_queries >= 4 * num_keys and fits(triton_configs.BACKWARD_DECODE, num_keys):
        kernel, rows, long_side = triton_configs.BACKWARD_DECODE, num_keys, num_queries
    else:
        # dK/dV: programs over key blocks, each summing over (a chunk of) the queries; dQ the
        # mirror image. (kernel, blocks of, summed over, programs per block)
        if wide:
            block = WIDE_BACKWARD_ROWS
            constexprs["BLOCK_CHUNK_V"] = wide_chunk(head_dim_v)
            constexprs["BLOCK_SLICE"] = WIDE_BACKWARD_SLICE
            kernels = ((triton_configs.BACKWARD_WIDE_DKDV, num_keys, num_queries,
                        cdiv(max(head_dim_qk, head_dim_v), WIDE_BACKWARD_SLICE)),
                       (triton_configs.BACKWARD_WIDE_DQ, num_queries, num_keys, cdiv(head_dim_qk, WIDE_BACKWARD_SLICE)))
        else:
            block = _backward_block(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"], exact_fp32)
            kernels = ((triton_configs.BACKWARD_DKDV, num_keys, num_queries, 1),
                       (triton_configs.BACKWARD_DQ, num_queries, num_keys, 1))
        constexprs["BLOCK_OUTER"] = block
        constexprs["CAUSAL"] = causal
        launches = []
        for kernel, outer, inner, slices in kernels:
            programs = cdiv(outer, block) * slices * batch * heads
            chunks, per_chunk = plan_chunks(programs, inner, device, num_chunks)
            meta, _ = _config(kernel, constexprs, element_bytes, per_chunk, device, block)
            launches.append(_BackwardKernelLaunch(kernel, chunks, per_chunk, (programs * chunks,), meta, slices))
        delta_block_dv = max(16, next_power_of_2(head_dim_v)) if wide else constexprs["BLOCK_DV"]
        return BackwardPlan(constexprs, tuple(launches), _delta_launch(head_dim_v, delta_block_dv))
    constexprs["BLOCK_OUTER"] = max(16, next_power_of_2(rows))
    chunks, per_chunk = plan_chunks(batch * heads, long_side, device, num_chunks)
    meta, _ = _config(kernel, constexprs, element_bytes, per_chunk, device, constexprs["BLOCK_OUTER"])
    return BackwardPlan(constexprs, (_BackwardKernelLaunch(kernel, chunks, per_chunk, (chunks * batch * heads,),
                                                           meta),), _delta_launch(head_dim_v, constexprs["BLOCK_DV"]))


def run_triton_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    num_chunks: Optional[int] = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) from the forward's out and lse; the residual's gradient is dout.

    num_chunks forces the number of chunks of the summed dimension (tests); by default
    plan_chunks picks it per kernel.
    """
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    plan = plan_triton_backward(batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v, q.element_size(),
                                q.device, is_exact_fp32(q.dtype, allow_tf32), key_padding_mask is not None,
                                num_chunks, backward_variant(), causal)
    constexprs = plan.constexprs
    delta = torch.empty((batch * heads, num_queries), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    inputs = (*q.stride(), *k.stride(), *v.stride(), *pad_strides, *dout.stride())
    sizes = (heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, scale * LOG2E)

    def chunk_targets(final: tuple[torch.Tensor, ...], chunks: int) -> tuple[torch.Tensor, ...]:
        # One chunk writes the gradients in place; several write fp32 partials summed below.
        if chunks == 1:
            return tuple(g.unsqueeze(0) for g in final)
        return tuple(torch.empty((chunks, *g.shape), dtype=torch.float32, device=g.device) for g in final)

    with _device_context(q):
        # Delta_i = dO_i . O_i over the attention output alone (out holds the residual too).
        res = residual if residual is not None else out
        delta_kernel, delta_rows, delta_block_dv = plan.delta
        _jit(delta_kernel)[(cdiv(num_queries, delta_rows) * batch * heads,)](
            out, res, dout, delta, *out.stride(), *res.stride(), *dout.stride(), heads, num_queries, head_dim_v,
            HAS_RESIDUAL=residual is not None, BLOCK_M=delta_rows, BLOCK_DV=delta_block_dv,
        )
        first = plan.launches[0]
        if first.kernel == triton_configs.BACKWARD_ENCODE:
            (part_dq,) = chunk_targets((dq,), first.chunks)
            _kernel(first.kernel)[first.grid](
                q, k, v, pad, dout, lse, delta, part_dq, dk, dv,
                *inputs, *part_dq.stride(), *dk.stride(), *dv.stride(), *sizes,
                first.chunks, first.per_chunk, next_power_of_2(first.per_chunk),
                **constexprs, **first.meta,
            )
            if first.chunks > 1:
                dq.copy_(part_dq.sum(0))
            return dq, dk, dv
        if first.kernel == triton_configs.BACKWARD_DECODE:
            part_dk, part_dv = chunk_targets((dk, dv), first.chunks)
            _kernel(first.kernel)[first.grid](
                q, k, v, pad, dout, lse, delta, dq, part_dk, part_dv,
                *inputs, *dq.stride(), *part_dk.stride(), *part_dv.stride(), *sizes,
                first.chunks, first.per_chunk, next_power_of_2(first.per_chunk),
                **constexprs, **first.meta,
            )
            if first.chunks > 1:
                dk.copy_(part_dk.sum(0))
                dv.copy_(part_dv.sum(0))
            return dq, dk, dv

        dkdv, dq_launch = plan.launches
        part_dk, part_dv = chunk_targets((dk, dv), dkdv.chunks)
        _kernel(dkdv.kernel)[dkdv.grid](
            q, k, v, pad, dout, lse, delta, part_dk, part_dv,
            *inputs, *part_dk.stride(), *part_dv.stride(), *sizes,
            dkdv.chunks, dkdv.per_chunk, next_power_of_2(dkdv.per_chunk),
            **constexprs, **dkdv.meta,
        )
        if dkdv.chunks > 1:
            dk.copy_(part_dk.sum(0))
            dv.copy_(part_dv.sum(0))

        (part_dq,) = chunk_targets((dq,), dq_launch.chunks)
        _kernel(dq_launch.kernel)[dq_launch.grid](
            q, k, v, pad, dout, lse, delta, part_dq,
            *inputs, *part_dq.stride(), *sizes,
            dq_launch.chunks, dq_launch.per_chunk, next_power_of_2(dq_launch.per_chunk),
            **constexprs, **dq_launch.meta,
        )
        if dq_launch.chunks > 1:
            dq.copy_(part_dq.sum(0))
    return dq, dk, dv
