"""Attention as matrix products over chunks of queries: the torch backend's path for wide heads.

Heads wider than 256 channels (the released Perceiver IO models' 261, 322 and 512) get
no fused SDPA kernel: flash and cuDNN refuse them, and SDPA falls back to its math
backend (every score in float32) or, for multiples of 8, to its memory-efficient
kernel, whose backward is slow there. Plain PyTorch in the inputs' dtype (product,
softmax, product) beat both (policy.py has the measurements); a softmax in float32
tensors of its own would triple the memory traffic.

This is that plain computation, bounded in memory:

- queries go in chunks whose scores take at most SCORE_CHUNK_ELEMENTS elements, so
  scores, probabilities and their gradients exist one chunk at a time;
- products run in the inputs' dtype (cuBLAS accumulates in float32) and the softmax
  is PyTorch's, which computes in float32 and rounds the probabilities once: the
  numerics of the plain computation the tests' tolerance rule measures against;
- the backward recomputes one chunk at a time and takes PyTorch's own gradient of
  it (activation checkpointing per chunk): nothing of size Nq x Nk is kept between
  the passes, and dK, dV are summed over the chunks.

Padding keys must arrive zeroed (the torch backend copies k and v with their padding
rows zeroed): a hidden key gets probability 0, and 0 times a NaN would still be NaN.
Rows that see no key are given every key for the computation and 0 as output, which
also gives them zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import causal_hidden

# Scores of one chunk of queries, all batch elements and heads: 2^27 elements (256 MiB
# in 16-bit). About four such buffers live at once in the backward (scores,
# probabilities, their gradients).
SCORE_CHUNK_ELEMENTS = 2**27


def rows_per_chunk(batch: int, heads: int, num_keys: int, budget_elements: int = SCORE_CHUNK_ELEMENTS) -> int:
    """Query rows per chunk: as many as keep the chunk's scores within the budget."""
    return max(1, budget_elements // (batch * heads * max(1, num_keys)))


def _chunk(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
           scale: float, causal: bool, num_queries: int, start: int) -> torch.Tensor:
    """Attention of the rows [start, start + len) of the queries: product, softmax, product."""
    rows, num_keys = q_rows.shape[2], k.shape[2]
    hidden = None
    if key_padding_mask is not None:
        hidden = key_padding_mask[:, None, None, :]
    if causal:
        triangle = causal_hidden(num_queries, num_keys, q_rows.device, start, rows)[None, None]
        hidden = triangle if hidden is None else hidden | triangle
    scores = torch.matmul(q_rows, k.transpose(-2, -1)) * scale
    if hidden is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    blind = hidden.all(dim=-1, keepdim=True)  # rows that see no key: given every key, then 0
    probs = torch.softmax(scores.masked_fill(hidden & ~blind, float("-inf")), dim=-1)
    return torch.matmul(probs, v).masked_fill(blind, 0.0)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale, causal, chunk_rows):
        num_queries = q.shape[2]
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for start in range(0, num_queries, chunk_rows):
            end = min(start + chunk_rows, num_queries)
            out[:, :, start:end] = _chunk(q[:, :, start:end], k, v, key_padding_mask, scale, causal, num_queries,
                                          start)
        ctx.save_for_backward(q, k, v, key_padding_mask)
        ctx.scale, ctx.causal, ctx.chunk_rows = scale, causal, chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises when asked for
    def backward(ctx, dout):
        q, k, v, key_padding_mask = ctx.saved_tensors
        num_queries = q.shape[2]
        dq = torch.empty_like(q)
        dk = dv = None
        k_leaf, v_leaf = k.detach().requires_grad_(), v.detach().requires_grad_()
        for start in range(0, num_queries, ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, num_queries)
            q_rows = q[:, :, start:end].detach().requires_grad_()
            with torch.enable_grad():
                out_rows = _chunk(q_rows, k_leaf, v_leaf, key_padding_mask, ctx.scale, ctx.causal, num_queries,
                                  start)
                dq_rows, dk_rows, dv_rows = torch.autograd.grad(out_rows, (q_rows, k_leaf, v_leaf),
                                                                dout[:, :, start:end])
            dq[:, :, start:end] = dq_rows
            dk, dv = (dk_rows, dv_rows) if dk is None else (dk.add_(dk_rows), dv.add_(dv_rows))
        return dq, dk, dv, None, None, None, None


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                      scale: float, causal: bool, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """softmax(q k^T * scale, hidden keys masked) v, queries in chunks of chunk_rows
    (default: rows_per_chunk). q, k, v: (B, H, N, D); key_padding_mask (B, Nk) bool,
    True = padding, whose k and v rows must be zero; causal: aligned at the bottom right."""
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(q.shape[0], q.shape[1], k.shape[2])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    return _ChunkedAttention.apply(q, k, v, key_padding_mask, scale, causal, chunk_rows)


__all__ = ["SCORE_CHUNK_ELEMENTS", "chunked_attention", "rows_per_chunk"]
