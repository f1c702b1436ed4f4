"""The "torch" backend: PyTorch SDPA, serving every input on every device."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..chunked_attention import chunked_attention
from ..chunking import cdiv, multiprocessor_count
from ..problem import Problem
from ..reference import causal_hidden, reference_attention
from .base import Backend

# How the backend runs a problem on a GPU, chosen from the H200's measurements
# (benchmarks/results/2026-12-01-h200-run1..3, bf16), where SDPA's own choice lost:
# - heads over SDPA_FUSED_MAX_HEAD_DIM channels (no flash or cuDNN kernel): matrix
#   products in query chunks (chunked_attention.py), 1.2-6.3x SDPA's best backend on
#   the released models' wide heads (run3; 28x SDPA's own choice on FLOW-512 training);
# - unmasked 16-bit heads up to 256 whose SDPA blocks (QUERY_BLOCK_ROWS rows each) are
#   under half the SMs: SDPA without cuDNN, so flash, which splits the keys where SDPA's
#   default choice, cuDNN, does not. ENC-3 (8 heads of 256 latents, 16 blocks): flash 0.74 ms, cuDNN
#   3.38; ENC-1 (128 blocks on 132 SMs) kept cuDNN, 0.45 against flash's 0.90.
SDPA_FUSED_MAX_HEAD_DIM = 256
QUERY_BLOCK_ROWS = 128
CHUNKED = "matrix products in query chunks"
FLASH_FIRST = "flash first"
SDPA_DEFAULT = "sdpa"


def gpu_route(device: torch.device, dtype: torch.dtype, batch: int, heads: int, num_queries: int, head_dim_qk: int,
              head_dim_v: int, masked: bool, dropout: bool) -> str:
    """CHUNKED, FLASH_FIRST or SDPA_DEFAULT (also off the GPU, where nothing was measured)."""
    if device.type != "cuda":
        return SDPA_DEFAULT
    if max(head_dim_qk, head_dim_v) > SDPA_FUSED_MAX_HEAD_DIM:
        return SDPA_DEFAULT if dropout else CHUNKED
    few_blocks = 2 * batch * heads * cdiv(num_queries, QUERY_BLOCK_ROWS) < multiprocessor_count(device)
    if few_blocks and not masked and dtype in (torch.float16, torch.bfloat16) and head_dim_qk == head_dim_v:
        return FLASH_FIRST
    return SDPA_DEFAULT


def _route_of(q, v, key_padding_mask, dropout_p) -> str:
    batch, heads, num_queries, head_dim_qk = q.shape
    return gpu_route(q.device, q.dtype, batch, heads, num_queries, head_dim_qk, v.shape[-1],
                     key_padding_mask is not None, dropout_p > 0)


class TorchBackend(Backend):
    """SDPA where it fits; on a GPU, matrix products in query chunks for heads SDPA has
    no fused kernel for (gpu_route); the exact reference where there are no keys at all.

    The only backend with attention dropout (SDPA's).

    Padding keys may hold anything, NaN and Inf included, yet must not reach the
    result: SDPA gives them weight 0 but still multiplies (0 * NaN = NaN) and adds
    its -inf bias to their scores (NaN - inf = NaN). So k and v are copied with their
    padding rows zeroed (one copy of each, the price of the contract on this path;
    the fused kernels never load padding rows), which also leaves those rows' input
    gradients exactly zero. SDPA's handling of rows whose keys are all hidden (padding,
    or causally out of reach) differs between its kernels (0 on some, NaN on others),
    so those rows never reach it: their keys are unmasked for the call and their output
    is zeroed afterwards, which also gives them exactly zero gradients.
    """

    name = "torch"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    dropout = True
    causal = True
    empty_dimensions = True

    def describe(self, problem: Problem) -> str:
        if problem.num_keys == 0:
            return "torch (exact reference: no keys)"
        route = gpu_route(problem.device, problem.dtype, problem.batch, problem.heads, problem.num_queries,
                          problem.head_dim_qk, problem.head_dim_v, problem.has_mask, problem.dropout)
        if route == CHUNKED:
            return (f"torch ({CHUNKED}: heads over {SDPA_FUSED_MAX_HEAD_DIM} channels; "
                    "scaled_dot_product_attention under torch.compile)")
        if route == FLASH_FIRST:
            return "torch (scaled_dot_product_attention, flash first: too few query blocks to fill the GPU)"
        return "torch (scaled_dot_product_attention)"

    def run(self, q, k, v, key_padding_mask: Optional[torch.Tensor], residual, scale, dropout_p, causal):
        if k.shape[2] == 0:
            return reference_attention(q, k, v, key_padding_mask=key_padding_mask, residual=residual, scale=scale,
                                       causal=causal)
        if key_padding_mask is not None:
            padding_rows = key_padding_mask[:, None, :, None]
            k, v = k.masked_fill(padding_rows, 0.0), v.masked_fill(padding_rows, 0.0)
        route = _route_of(q, v, key_padding_mask, dropout_p)
        if route == CHUNKED and torch.compiler.is_compiling():
            # The chunked path's backward runs autograd inside autograd, which a traced
            # graph does not take: compiled models keep SDPA's math path for wide heads.
            route = SDPA_DEFAULT
        if route == CHUNKED:
            out = chunked_attention(q, k, v, key_padding_mask, scale, causal)
        else:
            # cuDNN left out rather than flash put first: sdpa_kernel(..., set_priority=True)
            # left its order in place after the context on the H200 (torch 2.11), and every
            # later SDPA call of the process took flash (run2: ENC-1 0.88 ms instead of 0.44).
            backends = (sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
                        if route == FLASH_FIRST else contextlib.nullcontext())
            with backends:
                if causal:
                    out = _causal(q, k, v, key_padding_mask, scale, dropout_p)
                else:
                    out = _sdpa(q, k, v, None if key_padding_mask is None else key_padding_mask[:, None, None, :],
                                scale, dropout_p)
        return out if residual is None else out + residual


def _sdpa(q, k, v, hidden: Optional[torch.Tensor], scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA with a broadcastable bool mask of hidden keys; rows that see no key get 0."""
    if hidden is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    blind = hidden.all(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~hidden | blind, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(blind, 0.0)


# Causal masks with padding are built for this many (batch, query, key) cells at a time.
CAUSAL_MASK_CELLS = 2**26


def _causal(q, k, v, key_padding_mask, scale: float, dropout_p: float) -> torch.Tensor:
    """Bottom-right causal attention: query i sees keys j <= i + Nk - Nq.

    Rows before Nq - Nk see no key and stay 0. Without padding SDPA takes the causal
    pattern as a bias it never materialises; with padding the (B, rows, Nk) mask is
    built for chunks of query rows, so memory stays bounded however long the input.
    """
    batch, heads, num_queries, _ = q.shape
    num_keys = k.shape[2]
    blind_rows = max(0, num_queries - num_keys)
    seeing = q[:, :, blind_rows:]
    rows = num_queries - blind_rows
    if key_padding_mask is None:
        parts = [F.scaled_dot_product_attention(seeing, k, v, attn_mask=causal_lower_right(rows, num_keys),
                                                dropout_p=dropout_p, scale=scale)]
    else:
        chunk = max(1, CAUSAL_MASK_CELLS // (batch * num_keys))
        parts = []
        for start in range(0, rows, chunk):
            end = min(rows, start + chunk)
            hidden = causal_hidden(num_queries, num_keys, q.device, blind_rows + start, end - start)
            hidden = hidden[None, None] | key_padding_mask[:, None, None, :]
            parts.append(_sdpa(seeing[:, :, start:end], k, v, hidden, scale, dropout_p))
    if blind_rows:
        parts.insert(0, q.new_zeros(batch, heads, blind_rows, v.shape[-1]))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
