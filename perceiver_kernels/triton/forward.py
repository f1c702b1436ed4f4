"""Launchers of the Triton forward kernels: which kernels run a problem, their split
plan, configs, grid and buffers.

Everything a launch decides from the problem is computed once per Problem (and position
of the variants switch) and cached (`plan_forward`), so a steady-state call allocates
its outputs, gathers pointers and strides, and launches. explain() describes the same
cached plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from .. import kernel_launch
from ..kernel_launch import SplitPlan, allocate_output, cdiv, mask_operand, next_power_of_2, on_device, residual_operand
from ..problem import Call, Problem
from . import configs, decode, encode, tiling, variants, wide
from .merge import MergePlan, allocate_partials, launch_merge, plan_merge
from .kernels.common import LOG2E


class ForwardPlan(Protocol):
    """How a problem's forward runs, decided once: what explain() says, and the launch."""

    def describe(self, problem: Problem) -> str: ...

    def launch(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]: ...


# Rewrites no GPU has timed yet (variants.py), tried in order when the switch says
# "untimed": each returns its plan for a problem and a forced split count, or None where
# it does not serve the problem (the timed kernels run it then).
UNTIMED: tuple[Callable[[Problem, Optional[int]], Optional[ForwardPlan]], ...] = (
    decode.plan,  # DECODE: the latents resident, query tiles streamed by persistent programs (issue 23)
    encode.plan,  # ENCODE: all the latents of a head in one program, splits in waves (issue 24)
    wide.plan,  # heads of 257..512 channels, each score computed once (issue 25)
)


def _query_tile_rows(problem: Problem, block_dqk: int, block_dv: int) -> int:
    """Query rows per program of the split kernel: all the latents, up to a tile that fits.

    Exact fp32 dots run on CUDA cores with their operands in registers; taller tiles
    than 64 rows (32 from head dims of 128) spill there (sm_80 and sm_90, see
    tests/triton_compile.py and configs._register_budget_exceeded).
    """
    if problem.exact_fp32:
        largest = 32 if max(block_dqk, block_dv) >= 128 else 64
    else:
        largest = 64 if block_dv > 128 else 128
    return max(16, min(largest, next_power_of_2(problem.num_queries)))


def plan_splits(problem: Problem, num_splits: Optional[int] = None) -> SplitPlan:
    """The split plan of the forward (kernel_launch.plan_chunks); a wide head's programs
    are counted per slice of Dv."""
    if tiling.is_wide(problem):
        rows = tiling.WIDE_FORWARD_ROWS_EXACT_FP32 if problem.exact_fp32 else tiling.WIDE_FORWARD_ROWS
        tile_rows = max(16, min(rows, next_power_of_2(problem.num_queries)))
        slices = cdiv(problem.head_dim_v, tiling.WIDE_FORWARD_SLICE)
    else:
        tile_rows = _query_tile_rows(problem, *tiling.head_dim_blocks(problem))
        slices = 1
    programs = cdiv(problem.num_queries, tile_rows) * slices * problem.batch * problem.heads
    return kernel_launch.plan_splits(programs, problem.num_keys, tile_rows, problem.device, num_splits)


@dataclass(frozen=True)
class TiledForward:
    """The timed kernels: one program per query tile (attention_fwd_kernel), or split-KV
    (attention_fwd_split_kernel, then merge_splits_kernel); the wide kernels' slices of
    Dv for heads over 256 channels."""

    plan: SplitPlan
    kernel: str                # the tile kernel (num_splits == 1) or the split kernel
    constexprs: dict           # of the kernel, its config included (none chosen when autotuning)
    grid: Optional[tuple]      # None: autotuning picks BLOCK_M, the grid follows it
    scalars: tuple             # the kernel's arguments after its strides
    slices: int                # programs per query tile (and key chunk): one per slice of Dv
    merge: MergePlan

    def describe(self, problem: Problem) -> str:
        path = self.plan.describe()
        head_dims = tiling.describe_head_dims(problem)
        return f"{path}; {head_dims}" if head_dims else path

    def launch(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_tiled(self, call)


@functools.lru_cache(maxsize=4096)
def _plans(problem: Problem, num_splits: Optional[int], variant: str) -> ForwardPlan:
    if variant == variants.UNTIMED:
        for planner in UNTIMED:
            plan = planner(problem, num_splits)
            if plan is not None:
                return plan
    return _tiled(problem, num_splits)


def plan_forward(problem: Problem, num_splits: Optional[int] = None) -> ForwardPlan:
    """The plan of a problem's forward under the variants switch as it stands (num_splits
    forces the split count: tests)."""
    return _plans(problem, num_splits, variants.current)


plan_forward.cache_clear = _plans.cache_clear


def _tiled(problem: Problem, num_splits: Optional[int]) -> TiledForward:
    plan = plan_splits(problem, num_splits)
    constexprs = {**tiling.constexprs(problem), "HAS_RESIDUAL": problem.has_residual, "CAUSAL": problem.causal}
    wide = tiling.is_wide(problem)
    slices = 1
    if wide:
        constexprs["BLOCK_SLICE"] = tiling.WIDE_FORWARD_SLICE
        slices = cdiv(problem.head_dim_v, tiling.WIDE_FORWARD_SLICE)
    programs_per_row_block = slices * problem.batch * problem.heads
    if plan.num_splits == 1:
        kernel = configs.FORWARD_WIDE_TILE if wide else configs.FORWARD_TILE
        meta, config = configs.launch_meta(kernel, problem, constexprs, problem.num_keys)
        grid = (cdiv(problem.num_queries, config.block_m) * programs_per_row_block,) if config else None
    else:
        kernel = configs.FORWARD_WIDE_SPLIT if wide else configs.FORWARD_SPLIT
        meta, _ = configs.launch_meta(kernel, problem, constexprs, plan.keys_per_split, plan.query_tile_rows)
        meta = {**meta, "BLOCK_M": plan.query_tile_rows}
        grid = (cdiv(problem.num_queries, plan.query_tile_rows) * programs_per_row_block * plan.num_splits,)
    sizes = (problem.heads, problem.num_queries, problem.num_keys, problem.head_dim_qk, problem.head_dim_v,
             problem.scale * LOG2E)
    if plan.num_splits == 1:
        scalars = (*sizes, next_power_of_2(problem.num_keys))
    else:
        scalars = (*sizes, plan.num_splits, plan.keys_per_split, next_power_of_2(plan.keys_per_split))
    # The merge holds one fp32 output row per query: 256 channels take 32 rows to stay in
    # registers, and wider heads are merged in slices.
    if wide:
        merge_rows, merge_block_dv = tiling.WIDE_MERGE_BLOCK
    else:
        merge_block_dv = constexprs["BLOCK_DV"]
        merge_rows = min(32 if merge_block_dv > 128 else 64, plan.query_tile_rows)
    return TiledForward(plan, kernel, {**constexprs, **meta}, grid, scalars, slices,
                        plan_merge(problem, merge_rows, merge_block_dv))


def run_forward(call: Call, num_splits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernels on a validated call; returns (out, lse natural-log)."""
    return plan_forward(call.problem, num_splits).launch(call)


def _launch_tiled(launch: TiledForward, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    problem, q, k, v, key_padding_mask, residual = call
    out, lse = allocate_output(q, problem.head_dim_v)
    pad, pad_strides = mask_operand(call)
    res, res_strides = residual_operand(call, out)
    plan = launch.plan

    with on_device(q):
        if plan.num_splits == 1:
            grid = launch.grid or (lambda meta: (cdiv(problem.num_queries, meta["BLOCK_M"]) * launch.slices
                                                 * problem.batch * problem.heads,))
            configs.kernel(launch.kernel)[grid](
                q, k, v, pad, res, out, lse,
                *q.stride(), *k.stride(), *v.stride(), *pad_strides, *res_strides, *out.stride(),
                *launch.scalars, **launch.constexprs,
            )
            return out, lse

        part_out, part_lse = allocate_partials(problem, plan.num_splits, q.device)
        configs.kernel(launch.kernel)[launch.grid](
            q, k, v, pad, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), *pad_strides, *launch.scalars, **launch.constexprs,
        )
        launch_merge(launch.merge, problem, plan.num_splits, part_out, part_lse, res, res_strides, out, lse)
    return out, lse
