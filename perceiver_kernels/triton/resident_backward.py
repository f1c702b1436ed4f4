"""Launcher of the ENCODE/DECODE backward in five matrix products with the short side
resident (kernels/attention_bwd_resident.py): an untimed rewrite (variants.py) of the
two-kernel backward for the asymmetric shapes.

- ENCODE (up to 256 queries over more keys than queries): each program keeps all of a
  head's queries and owns a range of its key blocks; dK/dV complete per key block, dQ
  one fp32 partial per program.
- DECODE (up to 256 keys under more queries than keys), the mirror image: all of a
  head's keys resident, a range of query tiles per program; dQ complete per tile, dK/dV
  one fp32 partial per program; Delta formed in the kernel from O (no Delta pass, no
  Delta buffer growing with the queries).

A head's partials are summed in chunk order by sum_chunks_kernel (none with one program
per head). `plan_encode` and `plan_decode` return None, leaving the two-kernel backward
to run, for square and general shapes (self-attention over latents, Perceiver AR),
heads over 256 channels, fp32 with TF32 allowed (the compile check's suites compile
exact fp32 only), and tiles that would not fit the target's registers (_tiles): on
sm_90 DECODE over more than 128 keys at head dim 128; exact fp32 past 64 resident rows
(32 at head dim 128); before Hopper, past 128 resident rows or outside head-dim blocks
of 32-128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import machine
from ..kernel_launch import cdiv, mask_operand, next_power_of_2, on_device
from ..problem import Call, Problem
from . import configs, tiling
from .delta import compute_delta, plan_delta
from .kernels.common import LOG2E

# The resident side is one tile of up to 256 rows: the rows of every product whose
# result feeds another (S, dP and the gradient that stays with the resident side).
# Triton 3.6 lays such chained products out with all warps along their rows
# (AccelerateMatmul: warpsPerTileV3), 16 rows a warp, so on tensor cores a tile has 64
# rows per 4 warps (Hopper's wgmma takes 64 rows a warpgroup): 4 warps for 64 rows, 8
# above. Fewer rows would have the warpgroups repeat each other's work (a 64-key block
# under 8 warps compiled so, spilling, on sm_90). Exact fp32 dots run on CUDA cores:
# any tile from 16 rows, 8 warps.
MAX_RESIDENT_ROWS = 256
# The streamed side in blocks of BLOCK_INNER rows, the longest of these whose tiles
# fit (_tiles): the products whose rows would be the block are formed transposed, so no
# block length costs a product its wgmma.
STREAMED_ROWS = (64, 32, 16)
EXACT_FP32_STREAMED_ROWS = (32, 16)


@dataclass(frozen=True)
class TargetLimits:
    """What fits one target's registers, from ptxas on every launch of the compile
    check's untimed suites (tests/triton_compile.py) and a sweep of resident tiles of
    64-256 rows, blocks of 16-64 and head dims 16-256 in bf16 and exact fp32. Under
    triton 3.9 none spills; under triton 3.6 (the H200 machine's) 4 do (2026-12-03):
    ENCODE at 256 resident rows at head dim 128 (72 bytes, 144 causal) and causally at
    64 (56), and a causal 128-row DECODE tile on sm_90 (8).

    The estimate counts fp32 elements per thread: the resident side's accumulators (dQ
    for ENCODE; dK and dV for DECODE), three per score (S and dP in fp32, P and dS in
    16 bits, the visibility mask) and what a block adds (ENCODE: dK^T and dV^T; DECODE:
    dQ^T and the tile of O its Delta comes from)."""

    registers: int          # the estimate's bound
    resident_rows: int      # the tallest resident tile
    head_dim_blocks: tuple[int, int]  # the narrowest and the widest head-dim block


# sm_90 (wgmma reads its operands from shared memory): every sampled tile within 192
# compiled without spilling (ENC-1's 256 rows x 32-key blocks at head dim 64: 176, 237
# registers; DEC-1's 256 x 16: 184, 240), those above spilled but a few (DECODE 128 x 32
# at head dim 128: 208, 253 registers). Before it, mma.sync holds operands in registers:
# 96, 128 rows and head-dim blocks of 32-128 (DECODE 128 x 16 at 64: 96, 230 registers;
# 256-row tiles spilled from 66, a 256-channel block at 76, DECODE 128 x 32 at 16 at 66).
HOPPER = TargetLimits(registers=192, resident_rows=256, head_dim_blocks=(16, 256))
BEFORE_HOPPER = TargetLimits(registers=96, resident_rows=128, head_dim_blocks=(32, 128))
# Exact fp32 (FMA, operands in registers on any target): resident tiles of at most 64
# rows, rows x block x (Dqk + Dv) per thread within 512 (DECODE 64 x 16 at head dim 64:
# 216 registers; 128-row tiles spilled at 512, 1024 spilled).
EXACT_FP32_RESIDENT_ROWS = 64
EXACT_FP32_BUDGET = 512
NUM_STAGES = 2
EXACT_FP32_NUM_STAGES = 1
# Programs per head: the fewest whose makespan, with every SM running one program at a
# time (a program's accumulators take most of an SM's registers), is within
# MAKESPAN_TOLERANCE of the shortest, each program's fixed cost (loading the resident
# side, writing and summing its fp32 partial) counted as streamed rows, this many per
# resident row. Fewer programs, fewer partials: their memory adds to the backward's.
FIXED_COST_PER_RESIDENT_ROW = 2
MAKESPAN_TOLERANCE = 1.03
MAX_CHUNKS = 64
# The sum of partials: rows per program.
SUM_ROWS = 64


@dataclass(frozen=True)
class ResidentBackward:
    """(ENCODE) Delta, then one kernel with the short side resident, then (chunks > 1)
    the sum of its partials."""

    kernel: str               # configs.BACKWARD_ENCODE or configs.BACKWARD_DECODE
    chunks: int               # programs per head: partials of the summed side
    per_chunk: int            # streamed rows per program (a multiple of the streamed block)
    constexprs: dict          # the kernel's, tiles and launch config included
    delta: Optional[tuple[str, int, int]]  # ENCODE's Delta kernel; DECODE's kernel forms Delta from O

    @property
    def encode(self) -> bool:
        return self.kernel == configs.BACKWARD_ENCODE

    def describe(self) -> str:
        resident, streamed, written, summed = (("queries", "key", "dK/dV", "dQ") if self.encode else
                                               ("keys", "query", "dQ", "dK/dV"))
        sums = (f"{self.chunks} partials of {summed} per head summed in a fixed order" if self.chunks > 1 else
                f"{summed} written once")
        delta = "" if self.encode else ", Delta from O and dO in the kernel"
        return (f"{'ENCODE' if self.encode else 'DECODE'} backward in five products: all {resident} of a head "
                f"resident (a tile of {self.constexprs['BLOCK_RESIDENT']} rows), "
                f"{self.chunks} program{'s' if self.chunks > 1 else ''} per head over "
                f"{self.constexprs['BLOCK_INNER']}-{streamed} blocks; {written} written once per block, {sums}{delta}")

    def launch(self, call: Call, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch(self, call, dout, out, lse)


def plan_encode(problem: Problem, num_chunks: Optional[int] = None) -> Optional[ResidentBackward]:
    """The ENCODE plan, or None: more than 256 queries, no more keys than queries, wide
    heads. num_chunks (tests) forces the programs per head, the partials of dQ."""
    if problem.num_queries >= problem.num_keys:
        return None
    return _plan(problem, configs.BACKWARD_ENCODE, problem.num_queries, problem.num_keys, num_chunks)


def plan_decode(problem: Problem, num_chunks: Optional[int] = None) -> Optional[ResidentBackward]:
    """The DECODE plan, or None: more than 256 keys, no more queries than keys, wide
    heads. num_chunks (tests) forces the programs per head, the partials of dK and dV."""
    if problem.num_keys >= problem.num_queries:
        return None
    return _plan(problem, configs.BACKWARD_DECODE, problem.num_keys, problem.num_queries, num_chunks)


def _plan(problem: Problem, kernel: str, resident: int, streamed: int, num_chunks: Optional[int]
          ) -> Optional[ResidentBackward]:
    if tiling.is_wide(problem) or resident > MAX_RESIDENT_ROWS or problem.tf32:
        return None
    tiles = _tiles(problem, kernel, resident)
    if tiles is None:
        return None
    tile_rows, streamed_rows, warps, stages = tiles
    blocks = cdiv(streamed, streamed_rows)
    chunks = _programs_per_head(problem, blocks, tile_rows, streamed_rows, num_chunks)
    constexprs = dict(tiling.constexprs(problem), CAUSAL=problem.causal, BLOCK_INNER=streamed_rows,
                      BLOCK_RESIDENT=tile_rows, num_warps=warps, num_stages=stages)
    delta = plan_delta(problem) if kernel == configs.BACKWARD_ENCODE else None
    return ResidentBackward(kernel, chunks, cdiv(blocks, chunks) * streamed_rows, constexprs, delta)


def _tiles(problem: Problem, kernel: str, resident: int) -> Optional[tuple[int, int, int, int]]:
    """(resident tile rows, streamed block rows, warps, stages): the longest streamed block
    whose tiles fit the target's registers and shared memory, or None where none does.
    The interpreter takes Hopper's tiles (what the tests run is what the H200 runs)."""
    block_dqk, block_dv = tiling.head_dim_blocks(problem)
    architecture, shared_memory = configs.device_facts(problem.device)
    hopper = architecture == machine.INTERPRETER or machine.capability(architecture) >= 90
    limits = HOPPER if hopper else BEFORE_HOPPER
    if problem.exact_fp32:
        tile_rows, warps, stages = max(16, next_power_of_2(resident)), 8, EXACT_FP32_NUM_STAGES
        if tile_rows > EXACT_FP32_RESIDENT_ROWS:
            return None
        candidates = EXACT_FP32_STREAMED_ROWS
    else:
        tile_rows = max(64, next_power_of_2(resident))
        warps, stages, candidates = (4 if tile_rows == 64 else 8), NUM_STAGES, STREAMED_ROWS
        narrowest, widest = limits.head_dim_blocks
        blocks_fit = narrowest <= min(block_dqk, block_dv) and max(block_dqk, block_dv) <= widest
        if tile_rows > limits.resident_rows or not blocks_fit:
            return None
    threads = 32 * warps
    for streamed_rows in candidates:
        if problem.exact_fp32:
            fits = tile_rows * streamed_rows * (block_dqk + block_dv) / threads <= EXACT_FP32_BUDGET
        else:
            fits = _tensor_core_registers(kernel, tile_rows, streamed_rows, block_dqk, block_dv) / threads <= \
                limits.registers
        if fits and (not shared_memory or _shared_memory(problem, tile_rows, streamed_rows, stages) <= shared_memory):
            return tile_rows, streamed_rows, warps, stages
    return None


def _tensor_core_registers(kernel: str, tile_rows: int, streamed_rows: int, block_dqk: int, block_dv: int) -> int:
    """TargetLimits' estimate: fp32 elements a program holds on tensor cores."""
    scores = 3 * tile_rows * streamed_rows
    if kernel == configs.BACKWARD_ENCODE:
        return tile_rows * block_dqk + scores + streamed_rows * (block_dqk + block_dv)
    return tile_rows * (block_dqk + block_dv) + scores + streamed_rows * (block_dqk + block_dv)


def _shared_memory(problem: Problem, tile_rows: int, streamed_rows: int, stages: int) -> int:
    """Bytes of shared memory a launch takes, as sm_90 compiles showed: the resident
    operands, `stages` buffers of the streamed ones, P and dS for the transposed
    products, and the layout change of a transposed block before it is stored."""
    block_dqk, block_dv = tiling.head_dim_blocks(problem)
    elements = (tile_rows * (block_dqk + block_dv) + stages * streamed_rows * (block_dqk + block_dv)
                + 2 * tile_rows * streamed_rows + streamed_rows * max(block_dqk, block_dv))
    return elements * problem.dtype.itemsize


def _programs_per_head(problem: Problem, blocks: int, tile_rows: int, streamed_rows: int,
                       num_chunks: Optional[int]) -> int:
    """How many programs share a head's streamed blocks: forced (tests: every one
    honoured, programs past the last block write zero partials), or as MAKESPAN_TOLERANCE
    says."""
    if num_chunks is not None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
        return num_chunks
    slots = machine.multiprocessors(problem.device.type, problem.device.index)
    batch_heads = problem.batch * problem.heads
    fixed = FIXED_COST_PER_RESIDENT_ROW * tile_rows // streamed_rows

    def makespan(chunks: int) -> int:
        return cdiv(batch_heads * chunks, slots) * (cdiv(blocks, chunks) + fixed)

    candidates = range(1, min(MAX_CHUNKS, blocks) + 1)
    shortest = min(makespan(chunks) for chunks in candidates)
    return next(chunks for chunks in candidates if makespan(chunks) <= MAKESPAN_TOLERANCE * shortest)


def _launch(plan: ResidentBackward, call: Call, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem, q, k, v, key_padding_mask, _ = call
    batch_heads = problem.batch * problem.heads
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pad, pad_strides = mask_operand(call)
    # The summed side's gradients: in place with one program per head, else fp32 partials.
    summed = (dq,) if plan.encode else (dk, dv)
    if plan.chunks == 1:
        parts = tuple(g.unsqueeze(0) for g in summed)
    else:
        parts = tuple(torch.empty((plan.chunks, *g.shape), dtype=torch.float32, device=g.device) for g in summed)
    with on_device(q):
        # ENCODE reads Delta (B*H x Nq); DECODE reads O itself, beside dO.
        if plan.encode:
            row_sums, row_sum_strides = compute_delta(problem, plan.delta, out, dout), ()
            targets = (parts[0], dk, dv)
        else:
            row_sums, row_sum_strides = out, (out.stride(),)
            targets = (dq, *parts)
        configs.kernel(plan.kernel)[(plan.chunks * batch_heads,)](
            q, k, v, pad, dout, lse, row_sums, *targets,
            q.stride(), k.stride(), v.stride(), pad_strides, dout.stride(), *row_sum_strides,
            *(target.stride() for target in targets),
            problem.heads, problem.num_queries, problem.num_keys, problem.head_dim_qk, problem.head_dim_v,
            problem.scale, problem.scale * LOG2E, plan.chunks, plan.per_chunk, **plan.constexprs,
        )
        if plan.chunks > 1:
            for gradient, part in zip(summed, parts):
                length, dim = gradient.shape[2:]
                configs.kernel(configs.SUM_CHUNKS)[(cdiv(length, SUM_ROWS) * batch_heads,)](
                    part, gradient, part.stride(), gradient.stride(), problem.heads, length, dim, plan.chunks,
                    BLOCK_ROWS=SUM_ROWS, BLOCK_D=max(16, next_power_of_2(dim)),
                )
    return dq, dk, dv
