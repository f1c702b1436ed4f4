"""Launchers of the Triton forward kernels: tile sizes, the split-KV plan, grids."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .kernels import attention_fwd as kernels
from .problem import allocate_output

LOG2E = 1.4426950408889634

# Split-KV plan (ENCODE). A grid of (query tiles x B*H) programs leaves most of a
# GPU idle when there are few latents (ENC-3: 2 tiles x 8 heads = 16 programs for
# 132 SMs). Splitting the keys into S chunks multiplies the programs by S; we aim
# for PROGRAMS_PER_SM programs per SM so that one program's loads overlap another's
# math and the last partial wave costs little. Every split adds an fp32 partial of
# BLOCK_M x Dv per query tile and a merge pass, so a chunk must hold at least
# MIN_KEYS_PER_SPLIT keys (a few K/V blocks) for that cost to stay small against
# the K/V bytes it reads; MAX_SPLITS bounds the partial buffer and the merge loop.
PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 512
MAX_SPLITS = 128
# Chunks of at least this many keys start on a multiple of it (every key-block size
# the autotuner may choose divides it), so no key block straddles two chunks.
SPLIT_ALIGNMENT = 128
# The interpreter has no SMs; a small nominal count makes the CPU tests exercise
# the same split heuristic at small sizes.
INTERPRETER_NOMINAL_SMS = 4



@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _query_tile_rows(num_queries: int, block_dv: int) -> int:
    """Query rows per program of the split kernel: all the latents, up to a tile that fits."""
    largest = 64 if block_dv > 128 else 128
    return max(16, min(largest, triton.next_power_of_2(num_queries)))


def _tuning_bucket(keys_per_program: int) -> int:
    """Autotuning key: keys per program rounded up to a power of two, so that variable
    lengths share one tuned config instead of retuning for every length."""
    return triton.next_power_of_2(max(1, keys_per_program))


@dataclass(frozen=True)
class ForwardPlan:
    """How a forward call runs: unsplit (num_splits == 1) or split-KV."""

    num_splits: int
    keys_per_split: int
    query_tile_rows: int  # rows per program of the split kernel; the tile kernel autotunes its own

    def describe(self) -> str:
        if self.num_splits == 1:
            return "one program per query tile over all keys"
        return f"split-KV: {self.num_splits} chunks of {self.keys_per_split} keys, then a merge"


def plan_forward(
    batch: int, heads: int, num_queries: int, num_keys: int, head_dim_v: int,
    device: torch.device, num_splits: Optional[int] = None,
) -> ForwardPlan:
    """Chooses the number of key splits (see the constants above for the reasoning).

    num_splits forces a count (tests, tuning); it is capped so that no chunk is
    empty unless the keys run out before the chunks do.
    """
    tile_rows = _query_tile_rows(num_queries, triton.next_power_of_2(head_dim_v))
    if num_splits is None:
        programs = triton.cdiv(num_queries, tile_rows) * batch * heads
        wanted = triton.cdiv(PROGRAMS_PER_SM * _multiprocessor_count(device), programs)
        num_splits = max(1, min(wanted, num_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))
    elif num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    if num_splits == 1:
        return ForwardPlan(1, num_keys, tile_rows)
    keys_per_split = triton.cdiv(num_keys, num_splits)
    if keys_per_split >= SPLIT_ALIGNMENT:
        keys_per_split = triton.cdiv(keys_per_split, SPLIT_ALIGNMENT) * SPLIT_ALIGNMENT
    return ForwardPlan(triton.cdiv(num_keys, keys_per_split), keys_per_split, tile_rows)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    allow_tf32: bool,
    num_splits: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernels on validated inputs; returns (out, lse natural-log)."""
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    out, lse = allocate_output(q, head_dim_v)
    plan = plan_forward(batch, heads, num_queries, num_keys, head_dim_v, q.device, num_splits)

    # Absent mask/residual: any valid pointer with zero strides; the constexpr flags
    # make the kernels never read it.
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    res = residual if residual is not None else out
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    # fp32 inputs are computed in full precision unless the user allowed TF32, as in PyTorch.
    dot_precision = "tf32" if (q.dtype != torch.float32 or allow_tf32) else "ieee"
    common = dict(
        BLOCK_DQK=max(16, triton.next_power_of_2(head_dim_qk)),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        DOT_PRECISION=dot_precision,
        HAS_MASK=key_padding_mask is not None,
        HAS_RESIDUAL=residual is not None,
    )
    qk_scale_log2 = scale * LOG2E

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if plan.num_splits == 1:
            grid = lambda meta: (triton.cdiv(num_queries, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
            kernels.attention_fwd_kernel[grid](
                q, k, v, pad, res, out, lse,
                *q.stride(), *k.stride(), *v.stride(), *pad_strides, *res_strides, *out.stride(),
                heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
                _tuning_bucket(num_keys),
                **common,
            )
            return out, lse

        tiles = triton.cdiv(num_queries, plan.query_tile_rows)
        part_out = torch.empty((batch * heads, plan.num_splits, num_queries, head_dim_v),
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch * heads, plan.num_splits, num_queries), dtype=torch.float32, device=q.device)
        kernels.attention_fwd_split_kernel[(tiles * plan.num_splits * batch * heads,)](
            q, k, v, pad, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), *pad_strides,
            heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
            plan.num_splits, plan.keys_per_split,
            _tuning_bucket(plan.keys_per_split),
            BLOCK_M=plan.query_tile_rows,
            **common,
        )
        merge_rows = min(64, plan.query_tile_rows)
        kernels.merge_splits_kernel[(triton.cdiv(num_queries, merge_rows) * batch * heads,)](
            part_out, part_lse, res, out, lse,
            *res_strides, *out.stride(),
            heads, num_queries, head_dim_v, plan.num_splits,
            HAS_RESIDUAL=residual is not None, BLOCK_M=merge_rows, BLOCK_DV=common["BLOCK_DV"],
        )
    return out, lse

