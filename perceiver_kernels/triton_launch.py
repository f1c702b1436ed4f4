"""Launchers of the Triton kernels: tile sizes, the chunking (split) plans, grids."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from .chunking import SplitPlan, plan_chunks, plan_splits
from .kernels import attention_bwd, attention_fwd
from .kernels.common import LOG2E
from .problem import allocate_output


def _query_tile_rows(num_queries: int, block_dv: int, exact_fp32: bool) -> int:
    """Query rows per program of the split kernel: all the latents, up to a tile that fits.

    Exact fp32 dots run on CUDA cores with their operands in registers; taller tiles
    than 64 rows spill there (sm_80 and sm_90, see tests/triton_compile.py).
    """
    largest = 64 if block_dv > 128 or exact_fp32 else 128
    return max(16, min(largest, triton.next_power_of_2(num_queries)))


def is_exact_fp32(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """fp32 inputs are computed in full precision unless the user allowed TF32, as in PyTorch."""
    return dtype == torch.float32 and not allow_tf32


def _tuning_bucket(length_per_program: int) -> int:
    """Autotuning key: the rows a program walks rounded up to a power of two, so that
    variable lengths share one tuned config instead of retuning for every length."""
    return triton.next_power_of_2(max(1, length_per_program))


def plan_triton_forward(
    batch: int, heads: int, num_queries: int, num_keys: int, head_dim_qk: int, head_dim_v: int,
    device: torch.device, num_splits: Optional[int] = None, exact_fp32: bool = False,
) -> SplitPlan:
    """The split plan of the Triton forward (see chunking.plan_chunks)."""
    _, block_dv = head_dim_blocks(head_dim_qk, head_dim_v, tensor_cores=not exact_fp32)
    tile_rows = _query_tile_rows(num_queries, block_dv, exact_fp32)
    return plan_splits(batch, heads, num_queries, num_keys, tile_rows, device, num_splits)


def _shared_arguments(q, v, key_padding_mask, allow_tf32) -> tuple[torch.Tensor, tuple, dict]:
    """The mask pointer and strides, and the constexprs every kernel takes."""
    # Absent mask: any valid pointer with zero strides; HAS_MASK keeps it unread.
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    exact_fp32 = is_exact_fp32(q.dtype, allow_tf32)
    block_dqk, block_dv = head_dim_blocks(q.shape[-1], v.shape[-1], tensor_cores=not exact_fp32)
    constexprs = dict(
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
        DOT_PRECISION="ieee" if exact_fp32 else "tf32",  # tf32 is ignored for 16-bit inputs
        HAS_MASK=key_padding_mask is not None,
    )
    return pad, pad_strides, constexprs


def head_dim_blocks(head_dim_qk: int, head_dim_v: int, *, tensor_cores: bool) -> tuple[int, int]:
    """(BLOCK_DQK, BLOCK_DV): each head dim padded to a power of two of at least 16.

    On tensor cores a value block narrower than the query/key block is widened to
    it. Triton 3.6 on an H200 computed P @ V wrong for 16-bit BLOCK_DQK > BLOCK_DV
    (40/24: forward error 1.8, then illegal memory accesses) while every other pair,
    fp32 on CUDA cores, and the same call with equal blocks were right; the PTX of
    the failing launch shows correct operand packing, V layout and descriptors, so
    the fault is below what the compile check can see. tests/repro_chained_dots.py
    is the minimal kernel that shows whether an installed Triton is affected.
    """
    block_dqk = max(16, triton.next_power_of_2(head_dim_qk))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    if tensor_cores and block_dqk > block_dv:
        block_dv = block_dqk
    return block_dqk, block_dv


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernels on validated inputs; returns (out, lse natural-log)."""
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    out, lse = allocate_output(q, head_dim_v)
    plan = plan_triton_forward(batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v, q.device, num_splits,
                        is_exact_fp32(q.dtype, allow_tf32))

    pad, pad_strides, common = _shared_arguments(q, v, key_padding_mask, allow_tf32)
    # Absent residual: any valid pointer with zero strides; HAS_RESIDUAL keeps it unread.
    res = residual if residual is not None else out
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    common["HAS_RESIDUAL"] = residual is not None
    qk_scale_log2 = scale * LOG2E

    with _device_context(q):
        if plan.num_splits == 1:
            grid = lambda meta: (triton.cdiv(num_queries, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
            attention_fwd.attention_fwd_kernel[grid](
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
        attention_fwd.attention_fwd_split_kernel[(tiles * plan.num_splits * batch * heads,)](
            q, k, v, pad, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), *pad_strides,
            heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
            plan.num_splits, plan.keys_per_split,
            _tuning_bucket(plan.keys_per_split),
            BLOCK_M=plan.query_tile_rows,
            **common,
        )
        merge_rows = min(64, plan.query_tile_rows)
        attention_fwd.merge_splits_kernel[(triton.cdiv(num_queries, merge_rows) * batch * heads,)](
            part_out, part_lse, res, out, lse,
            *res_strides, *out.stride(),
            heads, num_queries, head_dim_v, plan.num_splits,
            HAS_RESIDUAL=residual is not None, BLOCK_M=merge_rows, BLOCK_DV=common["BLOCK_DV"],
        )
    return out, lse



def _backward_block(block_d: int) -> int:
    """Rows of what one backward program writes; wide heads halve it to fit registers."""
    return 32 if block_d > 128 else 64


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) from the forward's out and lse; the residual's gradient is dout.

    num_chunks forces the number of chunks of the summed dimension in both kernels
    (tests); by default plan_chunks picks it per kernel.
    """
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    # Delta_i = dO_i . O_i over the attention output alone (out holds the residual too).
    attention_out = out.float() if residual is None else out.float() - residual.float()
    delta = (dout.float() * attention_out).sum(-1).contiguous()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pad, pad_strides, common = _shared_arguments(q, v, key_padding_mask, allow_tf32)
    block = _backward_block(max(common["BLOCK_DQK"], common["BLOCK_DV"]))
    inputs = (*q.stride(), *k.stride(), *v.stride(), *pad_strides, *dout.stride())
    sizes = (heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, scale * LOG2E)

    def chunk_targets(final: tuple[torch.Tensor, ...], chunks: int) -> tuple[torch.Tensor, ...]:
        # One chunk writes the gradients in place; several write fp32 partials summed below.
        if chunks == 1:
            return tuple(g.unsqueeze(0) for g in final)
        return tuple(torch.empty((chunks, *g.shape), dtype=torch.float32, device=g.device) for g in final)

    with _device_context(q):
        key_blocks = triton.cdiv(num_keys, block)
        chunks, per_chunk = plan_chunks(key_blocks * batch * heads, num_queries, q.device, num_chunks)
        part_dk, part_dv = chunk_targets((dk, dv), chunks)
        attention_bwd.attention_bwd_dkdv_kernel[(key_blocks * chunks * batch * heads,)](
            q, k, v, pad, dout, lse, delta, part_dk, part_dv,
            *inputs, *part_dk.stride(), *part_dv.stride(), *sizes,
            chunks, per_chunk, _tuning_bucket(per_chunk),
            BLOCK_OUTER=block, **common,
        )
        if chunks > 1:
            dk.copy_(part_dk.sum(0))
            dv.copy_(part_dv.sum(0))

        query_blocks = triton.cdiv(num_queries, block)
        chunks, per_chunk = plan_chunks(query_blocks * batch * heads, num_keys, q.device, num_chunks)
        (part_dq,) = chunk_targets((dq,), chunks)
        attention_bwd.attention_bwd_dq_kernel[(query_blocks * chunks * batch * heads,)](
            q, k, v, pad, dout, lse, delta, part_dq,
            *inputs, *part_dq.stride(), *sizes,
            chunks, per_chunk, _tuning_bucket(per_chunk),
            BLOCK_OUTER=block, **common,
        )
        if chunks > 1:
            dq.copy_(part_dq.sum(0))
    return dq, dk, dv
