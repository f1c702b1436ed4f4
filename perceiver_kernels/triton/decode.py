"""Launcher of the persistent DECODE forward (kernels/decode_fwd.py), an untimed rewrite
(variants.py): its planner serves the problems whose keys fit one block, whatever the
number of queries, and declines the rest (the timed kernels run them).

Why it serves few queries too: with all keys in one block the kernel does the work of
the timed tile kernel's key loop in one pass, without rescaling; with fewer tiles than
programs the grid shrinks to one program per tile. The DECODE shapes (many query tiles
per head) are where it is meant to win: K and V are loaded once per head and program,
not once per query tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import machine
from ..kernel_launch import allocate_output, cdiv, mask_operand, next_power_of_2, on_device, residual_operand
from ..problem import Call, Problem
from . import configs, tiling
from .descriptors import host_descriptor, host_descriptor_fits
from .kernels.common import LOG2E

# The most keys a program keeps resident, in one block (K and V of one head in shared
# memory on Hopper); more take the timed kernels (online softmax over streamed key
# blocks). Fewer fit where heads are wide (_fits_registers).
MAX_KEYS = 256


# Query tiles, (rows, warps), in order of preference; the first whose shared memory
# fits runs. 128 rows on 8 warps: two warpgroups of 64 rows (wgmma's minimum) in one
# program per SM. 64 rows on 4 warps: where shared memory holds two programs per SM,
# they run independently (one's softmax beside the other's products), at the cost of
# a copy of K/V each. Untimed: a GPU run decides the order (an A/B sets this tuple and
# clears forward.plan_forward's cache).
TILE_CANDIDATES = ((128, 8), (64, 4))


@dataclass(frozen=True)
class Tiles:
    """A launch config of the decode kernel: query rows per tile, the resident key block,
    warps, query tiles in flight, and programs per SM."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int


def _fits_registers(problem: Problem, keys: int, block_dv: int) -> bool:
    """Whether one resident block of `keys` keys leaves the score tile room in registers,
    by rules ptxas confirmed without spills on sm_90 in triton 3.6 (the GPUs') and 3.9
    (CI's) (tests/triton_compile.py, suites "untimed" and "decode").

    With 64 query rows per warpgroup and K, V read by wgmma from shared memory, a
    thread holds keys/2 fp32 scores and keys/4 of P beside Dv/2 of the accumulator:
    3/4 (keys + BLOCK_DV) <= 240 compiled (256 keys at Dv 64, 128 at 128, 64 at 256)
    and spilled just past it (256 keys at Dv 128, 128 at 256). At 256 keys a head dim
    that is no multiple of 16 spilled (40/40, 64/24, 40/64; 48/48 did not). CAUSAL
    compares each score with its row's reach (with a mask, through its slot's key
    index, kept per column): 256 keys spilled 32-96 bytes and 128 keys at Dv 128 with
    a mask 8 bytes (3.6), so it counts keys/2 more.
    """
    cost = 3 * (keys + block_dv) / 4 + (keys / 2 if problem.causal else 0)
    aligned = problem.head_dim_qk % 16 == 0 and problem.head_dim_v % 16 == 0
    return cost <= 240 and (keys < 256 or aligned)


def _shared_memory_bytes(problem: Problem, block_m: int, stages: int, keys: int, block_dqk: int,
                         block_dv: int) -> int:
    """Shared memory of a program: the query tiles in flight, the resident K and V, the
    staged output and residual tiles (TMA); ptxas adds a few barriers."""
    staged = (2 if problem.has_residual else 1) * block_m * block_dv
    return (stages * block_m * block_dqk + keys * (block_dqk + block_dv) + staged) * problem.dtype.itemsize


def choose_tiles(problem: Problem, block_dqk: int, block_dv: int, arch: str,
                 shared_memory_limit: Optional[int]) -> Optional[Tiles]:
    """The tiles of a problem on an architecture, or None where the kernel does not run it.

    16-bit inputs on sm_90 (and the interpreter, which follows its choices with small
    tiles), all keys in one block of up to MAX_KEYS where registers allow
    (_fits_registers), query tiles from TILE_CANDIDATES, 2 query tiles in flight:

    - sm_90 alone: wgmma reads the resident K and V from shared memory, stored once per
      head. sm_80's mma.sync takes both operands from registers, so there the resident
      keys take the registers the scores need (255 registers at 128 keys of 64/64
      channels, spills in 3.9 at 256) and are stored to shared memory again for every
      tile; other architectures are not compiled here.
    - float32 (exact or TF32) takes the timed kernels: exact fp32 dots run on CUDA
      cores, where Triton stores K and V to shared memory again for every tile (1-3
      stores in the tile loop) and 64 keys of 32/32 or 64/64 channels spilled in one
      Triton or the other; the contract and compile checks do not run TF32.
    """
    if problem.dtype == torch.float32:
        return None
    if arch != machine.INTERPRETER and not 90 <= machine.capability(arch) < 100:
        return None
    keys = max(16, next_power_of_2(problem.num_keys))
    if not _fits_registers(problem, keys, block_dv):
        return None
    for block_m, warps in TILE_CANDIDATES:
        needed = _shared_memory_bytes(problem, block_m, 2, keys, block_dqk, block_dv)
        if shared_memory_limit is None or needed <= shared_memory_limit:
            break
    else:
        return None
    if arch == machine.INTERPRETER:
        # The same block with small tiles: more of them per program, so the tests walk
        # several and cross heads.
        return Tiles(32, keys, 4, 2, 1)
    # Two programs per SM where shared memory holds two: the second is resident where
    # registers allow (short blocks, narrow heads), else it is a second wave over the
    # same tiles.
    return Tiles(block_m, keys, warps, 2, min(2, shared_memory_limit // needed))


@dataclass(frozen=True)
class PersistentDecode:
    """The plan of one problem: kernel constexprs, config and programs."""

    constexprs: dict
    tiles: Tiles
    programs: int
    total_tiles: int

    def describe(self, problem: Problem) -> str:
        tiles = self.tiles
        per_program = self.total_tiles / self.programs
        streamed = "Q, the residual and O" if problem.has_residual else "Q and O"
        return (f"persistent DECODE: {self.programs} programs over {self.total_tiles} query tiles of "
                f"{tiles.block_m} rows ({per_program:.1f} per program, contiguous, head by head); each head's "
                f"{problem.num_keys} keys resident in one {tiles.block_n}-key block (K/V loaded once per head and "
                f"program), single-pass exact softmax; "
                f"{tiles.num_stages} query tiles in flight; {streamed} through TMA tensor descriptors where strides "
                f"and alignment allow, pointers otherwise")

    def launch(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(self, call)


def plan(problem: Problem, num_splits: Optional[int]) -> Optional[PersistentDecode]:
    """The plan of a problem, or None where the kernel does not serve it: a forced split
    count above 1, dropout, wide heads, empty dimensions, and (choose_tiles) float32,
    a GPU other than sm_90, keys that do not fit one resident block."""
    if num_splits not in (None, 1) or problem.dropout or tiling.is_wide(problem):
        return None
    if not (1 <= problem.num_keys <= MAX_KEYS and problem.num_queries >= 1 and problem.batch * problem.heads >= 1):
        return None
    arch, shared_memory_limit = configs.device_facts(problem.device)
    block_dqk, block_dv = tiling.head_dim_blocks(problem)
    tiles = choose_tiles(problem, block_dqk, block_dv, arch, shared_memory_limit)
    if tiles is None:
        return None
    total_tiles = problem.batch * problem.heads * cdiv(problem.num_queries, tiles.block_m)
    if total_tiles >= 2**31:  # the kernel numbers its tiles in 32 bits
        return None
    programs = min(total_tiles, tiles.programs_per_sm * machine.multiprocessors(problem.device.type,
                                                                                problem.device.index))
    constexprs = dict(
        HAS_MASK=problem.has_mask, HAS_RESIDUAL=problem.has_residual, CAUSAL=problem.causal,
        MASK_SLOTS=problem.has_mask or problem.num_keys < tiles.block_n,
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return PersistentDecode(constexprs, tiles, programs, total_tiles)


def _descriptor(x: torch.Tensor, block_m: int, block_d: int):
    return host_descriptor(x, [1, 1, block_m, block_d])


def _launch(launch: PersistentDecode, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    problem, q, k, v, key_padding_mask, residual = call
    out, lse = allocate_output(q, problem.head_dim_v)
    pad, pad_strides = mask_operand(call)
    res, res_strides = residual_operand(call, out)
    block_m, block_dqk, block_dv = launch.tiles.block_m, launch.constexprs["BLOCK_DQK"], launch.constexprs["BLOCK_DV"]
    streamed = (q, out, res) if problem.has_residual else (q, out)  # res is out otherwise, unread
    descriptors = all(host_descriptor_fits(x) for x in streamed)
    if descriptors:
        q_arg, out_arg = _descriptor(q, block_m, block_dqk), _descriptor(out, block_m, block_dv)
        res_arg = _descriptor(res, block_m, block_dv) if problem.has_residual else out_arg
    else:
        q_arg, res_arg, out_arg = q, res, out
    with on_device(q):
        configs.kernel(configs.DECODE_FORWARD)[(launch.programs,)](
            q_arg, k, v, pad, res_arg, out_arg, lse,
            q.stride(), k.stride(), v.stride(), pad_strides, res_strides, out.stride(),
            problem.batch * problem.heads, problem.heads, problem.num_queries, problem.num_keys,
            problem.head_dim_qk, problem.head_dim_v, problem.scale * LOG2E,
            DESCRIPTORS=descriptors, **launch.constexprs,
        )
    return out, lse
