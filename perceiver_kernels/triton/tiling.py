"""How the Triton kernels tile a problem's head dims: the narrow kernels' power-of-two
blocks, the wide kernels' chunks and slices, and the constexprs every launch shares.

Chosen with ptxas for sm_80 and sm_90 (tests/triton_compile.py reports registers,
spills and shared memory of every launch), not by timing.
"""

from __future__ import annotations

from ..kernel_launch import cdiv, next_power_of_2
from ..problem import Problem

# The narrow kernels hold q, k, v and their accumulators whole, each head dim padded to
# a power of two; up to 256 channels that fits. Wider heads take the wide kernels
# (kernels/attention_fwd_wide.py, attention_bwd_wide.py), whose tiles below were chosen
# at 261 channels, the worst case: rows of 261 elements are not 16-byte aligned, so
# every element is loaded with its own 64-bit address.
NARROW_MAX_HEAD_DIM = 256
# The widest head the contract suites and the compile check cover (the released
# Perceiver IO models' widest heads).
WIDE_MAX_HEAD_DIM = 1280
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


def is_wide(problem: Problem) -> bool:
    """Whether the head dims take the wide kernels."""
    return problem.max_head_dim > NARROW_MAX_HEAD_DIM


def wide_chunk(head_dim: int) -> int:
    """The chunk of the wide kernels' sums over a head dim: no wider than the dim needs."""
    return max(16, min(WIDE_CHUNK, next_power_of_2(head_dim)))


def head_dim_blocks(problem: Problem) -> tuple[int, int]:
    """(BLOCK_DQK, BLOCK_DV) of the narrow kernels: each head dim padded to a power of two
    of at least 16.

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
    block_dqk = max(16, next_power_of_2(problem.head_dim_qk))
    block_dv = max(16, next_power_of_2(problem.head_dim_v))
    if not problem.exact_fp32 and block_dqk > block_dv:
        block_dv = block_dqk
    return block_dqk, block_dv


def constexprs(problem: Problem) -> dict:
    """The constexprs every kernel of a problem takes: the head-dim blocks of the narrow
    kernels, or the chunk of the wide ones' sums over Dqk (forward and backward add
    their slice), the dots' precision and the mask flag."""
    if is_wide(problem):
        blocks = dict(BLOCK_CHUNK_QK=wide_chunk(problem.head_dim_qk))
    else:
        block_dqk, block_dv = head_dim_blocks(problem)
        blocks = dict(BLOCK_DQK=block_dqk, BLOCK_DV=block_dv)
    return dict(**blocks, DOT_PRECISION="ieee" if problem.exact_fp32 else "tf32",  # tf32 is ignored in 16 bits
                HAS_MASK=problem.has_mask)


def describe_head_dims(problem: Problem) -> str:
    """How the kernels tile the head dims, for explain(): "" for narrow heads."""
    if not is_wide(problem):
        return ""
    return (f"wide head {problem.head_dim_qk}/{problem.head_dim_v}: head-dim sums in chunks of up to {WIDE_CHUNK} "
            f"channels, the output in {cdiv(problem.head_dim_v, WIDE_FORWARD_SLICE)} slices of "
            f"{WIDE_FORWARD_SLICE} channels, each program recomputing the scores for its slice")
