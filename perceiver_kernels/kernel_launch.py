"""What the kernel launchers of every backend share: the split plan, the output's memory
layout, the device a launch runs on."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from . import machine

# Chunking plan. A kernel parallel over the blocks of what it writes leaves most of
# a GPU idle when those blocks are few: forward ENCODE has (query tiles x B*H)
# programs (ENC-3: 2 tiles x 8 heads = 16 programs for 132 SMs), backward dQ the
# same, backward dK/dV of DECODE (key blocks x B*H). Cutting the summed dimension
# (keys, or queries for dK/dV) into S chunks multiplies the programs by S; we aim
# for PROGRAMS_PER_SM programs per SM so that one program's loads overlap another's
# math and the last partial wave costs little. Every chunk adds an fp32 partial
# result and a reduction, so a chunk must hold at least MIN_CHUNK_LENGTH rows (a
# few blocks) for that cost to stay small against the bytes it reads; MAX_CHUNKS
# bounds the partial buffers and the reduction.
PROGRAMS_PER_SM = 2
MIN_CHUNK_LENGTH = 512
MAX_CHUNKS = 128
# Chunks of at least this many rows start on a multiple of it (every block size of
# the Triton kernels and of the CUDA kernels divides it), so no block straddles two
# chunks.
CHUNK_ALIGNMENT = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_chunks(programs: int, length: int, device: torch.device, num_chunks: Optional[int] = None) -> tuple[int, int]:
    """(number of chunks, rows per chunk) for cutting `length` rows summed by `programs` programs.

    num_chunks forces a count (tests, tuning); the result never has an empty chunk
    unless there are fewer rows than chunks.
    """
    if num_chunks is None:
        wanted = cdiv(PROGRAMS_PER_SM * machine.multiprocessors(device.type, device.index), max(1, programs))
        num_chunks = max(1, min(wanted, length // MIN_CHUNK_LENGTH, MAX_CHUNKS))
    elif num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    per_chunk = max(1, cdiv(length, num_chunks))
    if per_chunk >= CHUNK_ALIGNMENT:
        per_chunk = cdiv(per_chunk, CHUNK_ALIGNMENT) * CHUNK_ALIGNMENT
    return cdiv(max(1, length), per_chunk), per_chunk


@dataclass(frozen=True)
class SplitPlan:
    """How a forward runs: one program per query tile over all keys (num_splits == 1),
    or split-KV: each key chunk writes fp32 partials that a merge combines."""

    num_splits: int
    keys_per_split: int
    query_tile_rows: int  # rows per program (Triton) or block (CUDA) that the plan counted

    def describe(self) -> str:
        if self.num_splits == 1:
            return f"one program per {self.query_tile_rows}-row query tile over all keys"
        return (f"split-KV: {self.num_splits} chunks of {self.keys_per_split} keys per "
                f"{self.query_tile_rows}-row query tile, then a merge")


def plan_splits(programs: int, num_keys: int, query_tile_rows: int, device: torch.device,
                num_splits: Optional[int] = None) -> SplitPlan:
    """The split plan of a forward with `programs` programs unsplit, each taking
    `query_tile_rows` query rows."""
    return SplitPlan(*plan_chunks(programs, num_keys, device, num_splits), query_tile_rows)


def allocate_output(q: torch.Tensor, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, Dv) laid out as (B, Nq, H, Dv), and lse (B, H, Nq) in fp32.

    The (B, Nq, H, Dv) memory layout makes the usual merge of heads,
    out.transpose(1, 2).reshape(B, Nq, H * Dv), free of copies. Kernel launchers and
    their fake (meta) implementations both allocate here, so their strides agree.
    """
    batch, heads, num_queries, _ = q.shape
    out = torch.empty((batch, num_queries, heads, head_dim_v), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((batch, heads, num_queries), dtype=torch.float32, device=q.device)
    return out, lse


_NOTHING_TO_SWITCH = contextlib.nullcontext()


def on_device(x: torch.Tensor):
    """Kernels launch on the current device: a context that makes it the tensors' device
    (none to enter, the common case, when it already is)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NOTHING_TO_SWITCH


def mask_operand(call) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The key padding mask as a Triton kernel takes it: its bytes and strides, or (absent)
    any valid pointer with zero strides, which the kernel's HAS_MASK keeps unread."""
    if call.key_padding_mask is None:
        return call.q, (0, 0)
    return call.key_padding_mask.view(torch.uint8), call.key_padding_mask.stride()


def residual_operand(call, out: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The residual and its strides, or (absent) the output with zero strides, which the
    kernel's HAS_RESIDUAL keeps unread."""
    if call.residual is None:
        return out, (0, 0, 0, 0)
    return call.residual, call.residual.stride()
