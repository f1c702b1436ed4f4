"""Planner and launcher of the wide forward that computes each score once
(kernels/wide_fwd.py): heads above 256 channels, Dqk and Dv up to 512.

A plan fixes, per Problem: the power-of-two chunks of Dqk and Dv, the tile (query rows,
key block, warps, pipeline stages: chosen with ptxas, see TILES), how many slices of Dv
the programs of a query tile share (one, unless the accumulators outgrow the
registers), and the split of the keys. Each call then chooses TMA or pointer loads from
its tensors' strides (a Problem has no strides): TMA on Hopper where every row of q, k
and v starts 16-byte aligned, which heads stored at a multiple of 16 channels give (the
perceiver model layer stores wide heads so: perceiver/padding.py). Head dims that are
not multiples of 16 (261) are copied once, zero-padded, before the launch
(HEAD_ALIGNMENT).

Declined (None: the timed wide kernels run them): heads of at most 256 channels (the
narrow kernels), Dqk or Dv above 512 (the timed kernels' slices or the torch backend's
chunked products serve them), and what no tile holds without spilling: exact fp32
beyond 336 channels, and before Hopper anything but 16-bit heads of up to 272 channels
whose Dv is a multiple of 16.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from .. import machine
from ..kernel_launch import (MAX_CHUNKS, MIN_CHUNK_LENGTH, SplitPlan, allocate_output, cdiv, mask_operand,
                             next_power_of_2, on_device, plan_splits, residual_operand)
from ..problem import Call, Problem
from . import configs, tiling
from .descriptors import host_descriptor, host_descriptor_fits
from .kernels.common import LOG2E
from .merge import MergePlan, allocate_partials, launch_merge, plan_merge

MAX_HEAD_DIM = 512
# Head dims the kernel reads as they are; others are copied once, zero-padded to the next
# multiple (rows then 16-byte aligned for TMA, and loads through pointers vectorised:
# rows of 261 elements, read element by element, spilled hundreds of bytes of
# registers on sm_80 and sm_90).
HEAD_ALIGNMENT = 16
# Chunk widths of a head dim: powers of two up to a TMA box's 256 elements, at least the
# 16 channels an MMA sums over; at most three chunks per head dim (constexprs of the kernel).
CHUNK_WIDTHS = (256, 128, 64, 32, 16)
MAX_CHUNKS_PER_HEAD_DIM = 3


def chunk_widths(head_dim: int) -> tuple[int, int, int]:
    """Up to three power-of-two widths, largest first (each chunk then starts at a multiple
    of its width), covering head_dim with the fewest padding channels, then the fewest
    chunks; 0 for an absent chunk. 272 = 256 + 16, 336 = 256 + 64 + 16, 480 = 256 + 256."""
    best = None
    for count in range(1, MAX_CHUNKS_PER_HEAD_DIM + 1):
        for widths in itertools.combinations_with_replacement(CHUNK_WIDTHS, count):
            if sum(widths) >= head_dim and (best is None or (sum(widths), count) < (sum(best), len(best))):
                best = widths
    return best + (0,) * (MAX_CHUNKS_PER_HEAD_DIM - len(best))


@dataclass(frozen=True)
class Tile:
    block_m: int   # query rows per program: 64 per warpgroup (wgmma), warps along the rows
    block_n: int   # keys per block of the walk
    num_warps: int
    num_stages: int
    widest_qk: int     # the most Dqk channels (stored) this tile takes without spilling
    widest_slice: int  # the most Dv channels a program holds in this tile without spilling
    widest_masked_slice: Optional[int] = None  # the same with a key padding mask (default: widest_slice)

    def holds(self, stored_qk: int, stored_v: int, masked: bool) -> bool:
        widest = self.widest_masked_slice if masked and self.widest_masked_slice else self.widest_slice
        return stored_qk <= self.widest_qk and stored_v <= widest

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# Each table in order of preference, the first tile that fits runs. Chosen by compiling
# candidate tiles for sm_80 and sm_90 in every dtype, with and without mask, residual
# and causal, and kept where ptxas spilled nothing (`python -m tests.triton_compile
# --suites untimed-wide,untimed` compiles what the tables choose; tests/test_triton_compile.py
# checks it). That is triton 3.9's ptxas: under triton 3.6 (the H200 machine's) the
# unmasked, non-causal launches spill nothing either, but 22 masked or causal ones
# spill 8-104 bytes on sm_90 (most at 336 and 512 channels and in TF32; 2026-12-03,
# commit 1d12c15).
#
# Hopper (wgmma; Q, K and V tiles in shared memory). Every tile has 64 rows per
# warpgroup: Triton lays the warps of a dot that feeds another dot along the rows, so 8
# warps over 64 rows would compute every score twice. 128 rows (two warpgroups) read
# each K/V block for twice the rows of 64; queries that fit 64 rows take the
# one-warpgroup tiles first. Q.K^T reads its Q operand from shared memory for every
# 16-channel step, once per key block: 32-key blocks read it half as often per score as
# 16-key ones (where 128 x 32 outgrows shared memory, as with Dqk = 512, one warpgroup
# on 32 keys comes before two on 16). A program holds at most 336 channels of Dv (168
# fp32 accumulator registers a thread; 272 on 32-key blocks with a mask, whose pointer
# loads of V take registers too); wider Dv is cut into slices of 256 channels, one
# program each, each computing the scores again (Dv = 512 held whole spilled in every
# tile).
TILES = (
    Tile(128, 32, 8, 3, widest_qk=512, widest_slice=336, widest_masked_slice=272),
    Tile(128, 32, 8, 2, widest_qk=512, widest_slice=336, widest_masked_slice=272),
    Tile(64, 32, 4, 3, widest_qk=512, widest_slice=336, widest_masked_slice=272),
    Tile(128, 16, 8, 3, widest_qk=512, widest_slice=336),
    Tile(128, 16, 8, 2, widest_qk=512, widest_slice=336),
    Tile(64, 32, 4, 2, widest_qk=512, widest_slice=272),
    Tile(64, 16, 4, 2, widest_qk=512, widest_slice=336, widest_masked_slice=272),
)
SLICE = 256
# TF32 (fp32 tiles, twice the bytes; P in fp32): 272 channels fit shared memory in
# 128 x 16 tiles on sm_90 (no tile fits on sm_80); 64 x 32 spilled 40-160 bytes at 272
# and 336 spilled in every 64-row tile that fits, 512 fits none.
TF32_TILES = (Tile(128, 16, 8, 2, widest_qk=272, widest_slice=272),)
# Before Hopper (mma.sync holds the query tile in registers beside the accumulators):
# up to 272 channels each (336 spilled on sm_80), 16-key blocks (32 spilled), and Dv a
# multiple of 16 (see plan).
PRE_HOPPER_TILES = (
    Tile(128, 16, 8, 3, widest_qk=272, widest_slice=272),
    Tile(128, 16, 8, 2, widest_qk=272, widest_slice=272),
)
# Exact fp32 dots run on CUDA cores with both operands in registers, through pointers
# (TMA tiles spilled there): 16-row tiles up to 336 channels each (512 spilled), on
# Hopper (see plan).
EXACT_FP32_TILES = (Tile(16, 16, 8, 1, widest_qk=336, widest_slice=336),)


def shared_memory_bytes(tile: Tile, stored_qk: int, stored_v: int, element_bytes: int) -> int:
    """An upper estimate of a launch's shared memory: the query tile, `stages` buffers of a
    key block's K and V, and P staged for P.V."""
    streamed = tile.num_stages * tile.block_n * (stored_qk + stored_v)
    return element_bytes * (tile.block_m * stored_qk + streamed + tile.block_m * tile.block_n)


def _fits(tile: Tile, problem: Problem, stored_qk: int, stored_v: int, shared_memory_limit: Optional[int]) -> bool:
    if not tile.holds(stored_qk, stored_v, problem.has_mask):
        return False
    if tile.block_n > max(16, next_power_of_2(problem.num_keys)):
        return False  # a key block longer than the keys only multiplies padding
    return shared_memory_limit is None or shared_memory_bytes(
        tile, stored_qk, stored_v, problem.dtype.itemsize) <= shared_memory_limit


def _choose(problem: Problem, shared_memory_limit: Optional[int], hopper: bool
            ) -> Optional[tuple[Tile, tuple, tuple]]:
    """(tile, Dqk chunks, chunks of a Dv slice): all of Dv in one program where a tile holds
    it, else (Hopper, 16-bit or TF32 dots) slices of 256 channels."""
    qk_chunks = chunk_widths(problem.head_dim_qk)
    v_options = [chunk_widths(problem.head_dim_v)]
    if problem.exact_fp32:
        tiles = EXACT_FP32_TILES
    elif problem.dtype == torch.float32:
        tiles = TF32_TILES if hopper else ()
    elif hopper:
        tiles = TILES
        v_options.append(chunk_widths(SLICE))
    else:
        tiles = PRE_HOPPER_TILES
    # Queries that fit one warpgroup's rows try its tiles first (sorted is stable).
    tiles = sorted(tiles, key=lambda tile: tile.block_m > max(64, next_power_of_2(problem.num_queries)))
    for v_chunks in v_options:
        for tile in tiles:
            if _fits(tile, problem, sum(qk_chunks), sum(v_chunks), shared_memory_limit):
                return tile, qk_chunks, v_chunks
    return None


@dataclass(frozen=True)
class WideForward:
    """The plan of one problem: chunks, tile, split, and whether the architecture has TMA."""

    split: SplitPlan
    tile: Tile
    qk_chunks: tuple[int, int, int]
    v_chunks: tuple[int, int, int]  # of the Dv slice a program holds
    slices: int
    tma: bool  # TMA loads where the tensors allow (Hopper, 16-bit or TF32 dots)
    padded_widths: tuple[int, int]  # (Dqk, Dv) of the zero-padded copies of q, k and v; 0: none
    constexprs: dict
    grid: tuple[int]
    merge: MergePlan  # of the timed kernels' merge: slices of Dv that keep its fp32 rows in registers

    def describe(self, problem: Problem) -> str:
        def chunks(widths):
            return " + ".join(str(w) for w in widths if w)

        loads = "pointer loads"
        if self.tma:
            loads = "TMA loads where every row of q, k and v starts 16-byte aligned, else pointer loads"
        padded = [f"{name} to {width} channels" for name, width in zip(("q and k", "v"), self.padded_widths) if width]
        if padded:
            loads = (f"head dims {problem.head_dim_qk}/{problem.head_dim_v} are not multiples of {HEAD_ALIGNMENT}: "
                     f"one zero-padded copy of {' and '.join(padded)} first (heads stored at a multiple of "
                     f"{HEAD_ALIGNMENT} channels, as the perceiver model layer stores them, need none), then {loads}")
        tile = self.tile
        scores = "each score computed once"
        values = f"P into one fp32 accumulator per Dv chunk {chunks(self.v_chunks)}"
        if self.slices > 1:
            scores = f"the scores computed once per slice of Dv ({self.slices} slices)"
            values = (f"Dv in {self.slices} slices of {sum(self.v_chunks)} channels, one program each (wider "
                      f"accumulators spill), P into one fp32 accumulator per chunk {chunks(self.v_chunks)}")
        return (f"wide head {problem.head_dim_qk}/{problem.head_dim_v}, {scores}: {tile.block_m}-row query tiles "
                f"over {tile.block_n}-key blocks ({tile.num_warps} warps, {tile.num_stages} "
                f"stage{'s' if tile.num_stages > 1 else ''}), Q.K^T summed over Dqk in chunks "
                f"{chunks(self.qk_chunks)}, {values}; {loads}; {self.split.describe()}")

    def launch(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(self, call)


def plan(problem: Problem, num_splits: Optional[int] = None) -> Optional[WideForward]:
    """The plan of a wide head's forward (None where this kernel does not serve it)."""
    if not tiling.is_wide(problem) or problem.max_head_dim > MAX_HEAD_DIM:
        return None
    arch, limit = configs.device_facts(problem.device)
    hopper = arch == machine.INTERPRETER or machine.capability(arch) >= 90
    padded_widths = tuple(0 if dim % HEAD_ALIGNMENT == 0 else cdiv(dim, HEAD_ALIGNMENT) * HEAD_ALIGNMENT
                          for dim in (problem.head_dim_qk, problem.head_dim_v))
    if not hopper and (problem.exact_fp32 or padded_widths[1]):
        # sm_80 spilled 8-32 bytes storing rows of such a Dv element by element with a mask
        # and residual, and 8 bytes in exact fp32 at 272 channels.
        return None
    chosen = _choose(problem, limit, hopper)
    if chosen is None:
        return None
    tile, qk_chunks, v_chunks = chosen
    slices = cdiv(problem.head_dim_v, sum(v_chunks))
    tiles = cdiv(problem.num_queries, tile.block_m) * slices * problem.batch * problem.heads
    if num_splits is None:
        # These tiles take most of an SM's shared memory, one program each: split the keys
        # so that the programs fill the SMs once rather than leave a partial wave.
        sms = machine.multiprocessors(problem.device.type, problem.device.index)
        num_splits = max(1, min(sms // tiles, problem.num_keys // MIN_CHUNK_LENGTH, MAX_CHUNKS))
    split = plan_splits(tiles, problem.num_keys, tile.block_m, problem.device, num_splits)
    constexprs = dict(
        HAS_MASK=problem.has_mask, HAS_RESIDUAL=problem.has_residual, CAUSAL=problem.causal,
        SPLIT=split.num_splits > 1, DOT_PRECISION="ieee" if problem.exact_fp32 else "tf32",
        **dict(zip(("DQK0", "DQK1", "DQK2"), qk_chunks)), **dict(zip(("DV0", "DV1", "DV2"), v_chunks)),
        **tile.meta(),
    )
    return WideForward(split, tile, qk_chunks, v_chunks, slices, hopper and not problem.exact_fp32, padded_widths,
                       constexprs, (tiles * split.num_splits,), plan_merge(problem, *tiling.WIDE_MERGE_BLOCK))


def _descriptors(x: torch.Tensor, rows: int, widths: tuple[int, int, int]) -> list:
    """One 4-d descriptor per chunk (the first chunk's in an absent one's place, never read)."""
    made = {}
    for width in widths:
        if width and width not in made:
            made[width] = host_descriptor(x, [1, 1, rows, width])
    return [made[width or widths[0]] for width in widths]


def _launch(plan: WideForward, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    problem, q, k, v, key_padding_mask, residual = call
    out, lse = allocate_output(q, problem.head_dim_v)
    tile, split = plan.tile, plan.split
    padded_qk, padded_v = plan.padded_widths
    if padded_qk:
        q, k = (torch.nn.functional.pad(x, (0, padded_qk - problem.head_dim_qk)) for x in (q, k))
    if padded_v:
        v = torch.nn.functional.pad(v, (0, padded_v - problem.head_dim_v))
    qk_width, v_width = q.shape[-1], v.shape[-1]
    use_tma = plan.tma and all(host_descriptor_fits(x) for x in (q, k, v))
    sources = [q] * 3 + [k] * 3 + [v] * 3
    if use_tma:
        sources[:6] = _descriptors(q, tile.block_m, plan.qk_chunks) + _descriptors(k, tile.block_n, plan.qk_chunks)
        if not problem.has_mask:  # with a mask the kernel reads V through pointers
            sources[6:] = _descriptors(v, tile.block_n, plan.v_chunks)
    pad, pad_strides = mask_operand(call)
    res, res_strides = residual_operand(call, out)
    sizes = (problem.heads, problem.num_queries, problem.num_keys, qk_width, problem.head_dim_v, v_width,
             problem.scale * LOG2E, split.num_splits, split.keys_per_split)
    kernel = configs.kernel(configs.FORWARD_WIDE_ONCE)

    with on_device(q):
        if split.num_splits == 1:
            kernel[plan.grid](
                *sources, pad, res, out, lse,
                q.stride(), k.stride(), v.stride(), pad_strides, res_strides, out.stride(),
                *sizes, USE_TMA=use_tma, **plan.constexprs,
            )
            return out, lse
        part_out, part_lse = allocate_partials(problem, split.num_splits, q.device)
        kernel[plan.grid](
            *sources, pad, part_out, part_out, part_lse,
            q.stride(), k.stride(), v.stride(), pad_strides, (0, 0, 0, 0), out.stride(),
            *sizes, USE_TMA=use_tma, **plan.constexprs,
        )
        launch_merge(plan.merge, problem, split.num_splits, part_out, part_lse, res, res_strides, out, lse)
    return out, lse
