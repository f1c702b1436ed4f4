"""Launcher of the untimed ENCODE forward (kernels/encode_fwd.py): which problems it
serves, its rows per program, its split plan in waves of the GPU's SMs, its merge.

ENCODE (Problem.encode: Nk >= 4 Nq) with up to MAX_QUERIES queries per head. A
program holds up to 256 query rows (fewer for wide heads and exact fp32, whose tiles
spill sooner): all the latents of a head in the usual Perceiver IO shapes, so each
K/V tile is read from memory once per split. A head with more queries (Perceiver AR's
1,024 latents, ENC-2's 2,048) runs as query groups in adjacent programs that walk the
same keys together, so all but the first read of each tile hit L2.

The split count is chosen in waves of the GPU's SMs (split_count). The merge is the
timed merge_splits_kernel, a kernel of its own rather than fused into the last split
program of each head (an atomic counter per head electing it): a fused merge reads a
head's S partials on one SM, and ENC-3's 33 partials of 64 KB per head are 2.1 MB,
20-35 us at one SM's share of L2 bandwidth (60-100 GB/s), added to the end of the last
wave; merge_splits_kernel spreads the 17 MB over every SM (about 5 us) and, launched
with programmatic dependent launch on sm_90+ (the split kernel lets it launch once
all its programs have started; it waits on griddepcontrol for their completion),
costs no launch gap. It needs no zeroed counters either (a persistent buffer would be
shared by concurrent streams and baked into captured CUDA graphs), and it is
deterministic: one program combines each row's partials in split order.

Declined (the timed kernels run them): not ENCODE, more than MAX_QUERIES queries,
heads over 256 channels, dropout, TF32. Registered in forward.UNTIMED: it runs only
with the variants switch on "untimed".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import machine
from ..kernel_launch import (CHUNK_ALIGNMENT, MAX_CHUNKS, allocate_output, cdiv, mask_operand, next_power_of_2,
                             on_device, plan_chunks, residual_operand)
from ..problem import Call, Problem
from . import configs, tiling
from .descriptors import device_descriptors_fit, ensure_device_descriptor_allocator
from .kernels.common import LOG2E
from .merge import MergePlan, allocate_partials, launch_merge, plan_merge

# ENCODE's latents: 128..2,048 per head in Perceiver IO and AR (the brief's range).
MAX_QUERIES = 2048
# Rows per program: 256 query rows (two 128-row warpgroups) hold the usual latent
# arrays; an fp32 accumulator row of Dv channels costs Dv / 2 registers per thread of
# a 64-row warpgroup, so wider value heads take fewer rows. Exact fp32 dots run on CUDA
# cores with both operands in registers: 64 rows (32 from head dims of 128), as the
# timed split kernel (forward._query_tile_rows).
MAX_ROWS = {64: 256, 128: 128, 256: 64}
MAX_ROWS_EXACT_FP32 = {64: 64, 128: 32, 256: 32}
# The warp-specialized key loop (Hopper, Triton 3.6): on or off for the whole process,
# read once at import, so that a GPU run can time both.
WARP_SPECIALIZE = os.environ.get("PERCEIVER_KERNELS_ENCODE_WS", "1") == "1"
# Its configs per BLOCK_DV, from the compile check (Triton 3.6 and 3.9, sm_90): 64-key
# tiles (128 spilled at 256 rows), 3 stages up to 64 channels (256 rows: 115 KB of
# shared memory), 2 at 128 (164 KB). At 256 channels the specialized loop needs 295 KB
# of shared memory even at 64 rows: none.
WARP_SPECIALIZED_CONFIGS = {16: configs.LaunchConfig(64, 4, 3), 32: configs.LaunchConfig(64, 4, 3),
                            64: configs.LaunchConfig(64, 4, 3), 128: configs.LaunchConfig(64, 4, 2)}
# Fewer rows than one warpgroup's wgmma tile: no specialization.
WARP_SPECIALIZED_MIN_ROWS = 64
# What a split costs beyond its keys, in keys' worth of time per query row: its fp32
# partial (rows x Dv x 4 bytes: as many bytes as one key of 16-bit K and V per row when
# Dqk = Dv) written at the end of the program, and read back by the merge (spread over
# all SMs, about as long again: ENC-3's 33 partials per head are 17 MB, ~5 us, about
# one key per row of a program's time).
SPLIT_COST_KEYS_PER_ROW = 2


def rows_per_program(problem: Problem, block_dqk: int, block_dv: int, architecture: str) -> int:
    """Query rows per program: all the queries of a head up to the rows that fit.

    Before Hopper, mma.sync holds the dots' operands in registers: 256 rows spilled
    there with 16 warps (sm_80, head dim 64, masked), so 128 is the most.
    """
    caps = MAX_ROWS_EXACT_FP32 if problem.exact_fp32 else MAX_ROWS
    cap = caps[max(64, block_dqk, block_dv)]
    if architecture != machine.INTERPRETER and machine.capability(architecture) < 90:
        cap = min(cap, 128)
    return max(16, min(cap, next_power_of_2(problem.num_queries)))


def split_count(programs: int, num_keys: int, rows: int, slots: int) -> int:
    """Splits of the keys for `programs` programs (query groups x batch*head) on
    `slots` SMs: the count with the least estimated time, the fewest on a tie.

    With one program per SM (a 256-row program fills one), a grid runs in
    ceil(programs * S / slots) waves of Nk / S keys each, plus each split's partial
    (SPLIT_COST_KEYS_PER_ROW). So the plan fills whole waves: ENC-1 (64 heads, 50,176
    keys, 132 SMs) takes 2 splits (128 programs, one wave), ENC-3 (8 heads, 400,000)
    33 (264 programs, two full waves), and a grid that fills the GPU unsplit stays so
    (no merge). Splits hold at least CHUNK_ALIGNMENT keys.
    """
    most = max(1, min(MAX_CHUNKS, num_keys // CHUNK_ALIGNMENT))

    def estimated_time(splits: int) -> float:
        waves = cdiv(programs * splits, slots)
        return waves * (num_keys / splits + (SPLIT_COST_KEYS_PER_ROW * rows if splits > 1 else 0))

    return min(range(1, most + 1), key=lambda splits: (estimated_time(splits), splits))


def _rows_and_config(problem: Problem, block_dqk: int, block_dv: int, keys_per_program: int
                     ) -> Optional[tuple[int, configs.LaunchConfig]]:
    """The most rows per program (from rows_per_program down) that a config fits, with
    that config; None where none fits (the planner declines)."""
    rows = rows_per_program(problem, block_dqk, block_dv, configs.device_facts(problem.device)[0])
    while rows >= 16:
        shape = configs.ShapeClass(configs.ENCODE_FORWARD, block_dqk, block_dv, problem.exact_fp32,
                                   problem.dtype.itemsize, keys_per_program, rows)
        config = configs.first_fit(shape, problem.device)
        if config is not None:
            return rows, config
        rows //= 2
    return None


def _warp_specialized_config(problem: Problem, architecture: str, rows: int, block_dv: int
                             ) -> Optional[configs.LaunchConfig]:
    """The config of the warp-specialized key loop, or None where it does not run.

    Triton 3.6 specializes the loop on Hopper (a TMA producer warpgroup, the rows split
    between two consumer warpgroups) only with device-side descriptors for Q, K and V
    and num_warps=4 (each consumer group then gets 4 warps; 8 compiled without
    specialization). It runs in 16 bits (wgmma), without a mask (see the kernel), with
    at least WARP_SPECIALIZED_MIN_ROWS rows, and in the interpreter too, where tl.range
    ignores the flag but the single-loop key walk it needs is tested.
    PERCEIVER_KERNELS_ENCODE_WS=0 turns it off (the GPU run times both).
    """
    if (not WARP_SPECIALIZE or problem.has_mask or problem.dtype not in (torch.float16, torch.bfloat16)
            or rows < WARP_SPECIALIZED_MIN_ROWS):
        return None
    if architecture != machine.INTERPRETER and machine.capability(architecture) != 90:
        return None
    return WARP_SPECIALIZED_CONFIGS.get(block_dv)


@dataclass(frozen=True)
class EncodeForward:
    """The plan of one ENCODE problem: grid, blocks, splits, merge."""

    rows: int                  # query rows per program (BLOCK_M)
    groups: int                # programs per (batch*head, split): query groups
    num_splits: int
    keys_per_split: int
    config: configs.LaunchConfig
    constexprs: tuple[dict, dict]  # the kernel's, with K/V through pointers and through descriptors
    merge: MergePlan           # launched with programmatic dependent launch on sm_90+
    slots: int                 # the SMs the split plan counted

    @property
    def dependent_launch(self) -> bool:
        return "launch_pdl" in self.merge.constexprs

    @property
    def programs(self) -> int:
        return self.groups * self.num_splits

    def describe(self, problem: Problem) -> str:
        heads = problem.batch * problem.heads
        if self.groups == 1:
            queries = "the query" if problem.num_queries == 1 else f"all {problem.num_queries} queries"
            holding = f"{queries} of a head in one {self.rows}-row program"
        else:
            holding = (f"the {problem.num_queries} queries of a head in {self.groups} adjacent {self.rows}-row "
                       "programs walking the same keys (each K/V tile read from memory once, then from L2)")
        programs = heads * self.programs
        waves = f"{programs} programs on {self.slots} SMs ({programs / self.slots:.2f} waves)"
        if self.num_splits == 1:
            keys = f"each over all {problem.num_keys} keys, {waves}, no merge"
        else:
            merge = "merge_splits_kernel" + (" launched with programmatic dependent launch"
                                             if self.dependent_launch else "")
            keys = f"{self.num_splits} splits of {self.keys_per_split} keys per head, {waves}, then {merge}"
        _, descriptors = self.constexprs
        loads = ("Q, K and V through tensor descriptors (TMA) where strides allow (16-byte aligned rows, contiguous "
                 "channels), pointers otherwise" if descriptors["KV_DESCRIPTORS"] else "Q, K and V through pointers")
        tma = (f"{loads}; {self.config.inner}-key tiles in {self.config.num_stages} stages, "
               f"{self.config.num_warps} warps")
        ws = (f"; where descriptors run, one warp-specialized key loop ({descriptors['BLOCK_N']}-key tiles in "
              f"{descriptors['num_stages']} stages: a TMA producer warpgroup, two consumer warpgroups of "
              f"{self.rows // 2} rows)" if descriptors["WARP_SPECIALIZE"] else "")
        return f"untimed ENCODE kernel: {holding}; {keys}; {tma}{ws}"

    def launch(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(self, call)


def plan(problem: Problem, num_splits: Optional[int] = None) -> Optional[EncodeForward]:
    """The plan of an ENCODE problem (num_splits forces the split count: tests), or None
    where this kernel does not serve it."""
    # TF32 declined: its fp32 operands double the tiles' shared memory and registers
    # (256 rows spilled at head dim 64, 64 rows at 256 on sm_90), and no GPU run times it.
    if (not problem.encode or problem.num_queries > MAX_QUERIES or tiling.is_wide(problem) or problem.dropout
            or problem.num_queries == 0 or problem.num_keys == 0 or problem.tf32):
        return None
    block_dqk, block_dv = tiling.head_dim_blocks(problem)
    chosen = _rows_and_config(problem, block_dqk, block_dv, problem.num_keys)
    if chosen is None:
        return None
    rows, _ = chosen
    groups = cdiv(problem.num_queries, rows)
    slots = machine.multiprocessors(problem.device.type, problem.device.index)
    if num_splits is None:
        num_splits = split_count(problem.batch * problem.heads * groups, problem.num_keys, rows, slots)
    num_splits, keys_per_split = plan_chunks(1, problem.num_keys, problem.device, num_splits)
    # Short splits take shorter key tiles (a tile past the keys only adds padding).
    chosen = _rows_and_config(problem, block_dqk, block_dv, keys_per_split)
    if chosen is None or chosen[0] != rows:
        return None
    config = chosen[1]

    # configs' view of the device (the compile check stands a GPU in for the CPU there).
    architecture, _ = configs.device_facts(problem.device)
    hopper = machine.capability(architecture) >= 90
    constexprs = dict(
        tiling.constexprs(problem), HAS_RESIDUAL=problem.has_residual, CAUSAL=problem.causal,
        NEGATIVE_SCALE=problem.scale < 0, BLOCK_M=rows, BLOCK_N=config.inner, num_warps=config.num_warps,
        num_stages=config.num_stages, PARTIALS=num_splits > 1, LAUNCH_DEPENDENTS=hopper and num_splits > 1,
        WARP_SPECIALIZE=False, WHOLE_TILES=False,
    )
    pointers = dict(constexprs, KV_DESCRIPTORS=False)
    # Descriptors are TMA on Hopper; before it Triton lowers them to plain loads, so
    # pointers serve there (the interpreter runs both paths). Exact fp32 dots run on
    # CUDA cores from registers: tiles that TMA lands in shared memory only add a copy
    # (64 rows spilled 432 bytes on sm_90 through descriptors, none through pointers).
    tensor_cores = not problem.exact_fp32
    descriptors = dict(constexprs, KV_DESCRIPTORS=tensor_cores and (hopper or architecture == machine.INTERPRETER))
    specialized = _warp_specialized_config(problem, architecture, rows, block_dv)
    if specialized is not None:
        whole = not problem.causal and problem.num_keys % specialized.inner == 0 and (
            num_splits == 1 or keys_per_split % specialized.inner == 0)
        descriptors.update(WARP_SPECIALIZE=True, WHOLE_TILES=whole, BLOCK_N=specialized.inner,
                           num_warps=specialized.num_warps, num_stages=specialized.num_stages)
    # The merge holds one fp32 row of Dv channels per query and thread group: 64 rows
    # (32 from 256 channels) stay in registers; fewer when that leaves SMs idle (ENC-3:
    # 8 heads x 256 queries merge in 128 programs of 16 rows, not 32 of 64).
    rows_to_fill = 1 << max(0, (problem.batch * problem.heads * problem.num_queries // slots).bit_length() - 1)
    merge_rows = max(16, min(32 if block_dv > 128 else 64, rows_to_fill))
    return EncodeForward(rows, groups, num_splits, keys_per_split, config, (pointers, descriptors),
                         plan_merge(problem, merge_rows, block_dv, dependent_launch=hopper), slots)


def _launch(plan: EncodeForward, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    problem, q, k, v, key_padding_mask, residual = call
    out, lse = allocate_output(q, problem.head_dim_v)
    pad, pad_strides = mask_operand(call)
    res, res_strides = residual_operand(call, out)
    # Descriptors where the plan has them and the call's tensors allow (strides belong
    # to the call).
    descriptors = plan.constexprs[True]["KV_DESCRIPTORS"] and device_descriptors_fit(q, k, v)
    constexprs = plan.constexprs[descriptors]
    heads = problem.batch * problem.heads
    split = plan.num_splits > 1
    if split:
        part_out, part_lse = allocate_partials(problem, plan.num_splits, q.device)
    else:
        part_out, part_lse = out, lse  # unread: one split writes out and lse

    with on_device(q):
        if descriptors and q.is_cuda:
            ensure_device_descriptor_allocator()
        configs.kernel(configs.ENCODE_FORWARD)[(heads * plan.programs,)](
            q, k, v, pad, res, out, lse, part_out, part_lse,
            q.stride(), k.stride(), v.stride(), pad_strides, res_strides, out.stride(),
            problem.heads, problem.num_queries, problem.num_keys, problem.head_dim_qk, problem.head_dim_v,
            abs(problem.scale) * LOG2E, plan.num_splits, plan.keys_per_split,
            **constexprs,
        )
        if split:
            launch_merge(plan.merge, problem, plan.num_splits, part_out, part_lse, res, res_strides, out, lse)
    return out, lse
