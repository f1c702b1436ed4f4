"""Attention as matrix products over chunks of queries: the torch backend's path for wide heads.

Heads wider than 256 channels (the released Perceiver IO models' 261, 322 and 512) get
no fused SDPA kernel: flash and cuDNN refuse them, SDPA then takes its math backend,
which holds every score in float32, or for multiples of 8 the memory-efficient kernel,
whose backward is slow there. On the H200 (benchmarks/results/2026-12-01-h200-run1,
bf16) plain matrix products with a softmax between them beat both: IMG-261 forward
4.8 ms against SDPA's 8.9, forward+backward 13.1 against 22.7; FLOW-512 decode
forward+backward 11.9 ms against 51 (math) and 228 (memory-efficient). This module
computes the same but bounded in memory, for inference and training:

- queries go in chunks whose float32 scores take at most SCORE_CHUNK_BYTES (the
  scores, their probabilities and their gradient live one chunk at a time);
- the softmax is taken in float32; the products run in the inputs' dtype (cuBLAS
  accumulates in float32), so a score is rounded to that dtype once, as in the
  plain PyTorch computation the tolerance rule of the tests measures against;
- the backward recomputes each chunk's probabilities from the saved log-sum-exp,
  so nothing of size Nq x Nk is kept for it; dK and dV are summed over the chunks
  in their dtype (one rounding per chunk).

Padding keys must arrive zeroed (the torch backend copies k and v with their padding
rows zeroed): a hidden key gets probability 0, and 0 times a NaN would still be NaN.
A row that sees no key gets 0 and zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import causal_hidden

# Float32 scores of one chunk of queries (all batch elements and heads): 256 MiB. Three
# such buffers live at once in the backward (scores, their dtype copy, dP).
SCORE_CHUNK_BYTES = 2**28


def rows_per_chunk(batch: int, heads: int, num_keys: int, budget_bytes: int = SCORE_CHUNK_BYTES) -> int:
    """Query rows per chunk: as many as keep the chunk's float32 scores within the budget."""
    return max(1, budget_bytes // (4 * batch * heads * max(1, num_keys)))


def _hidden(key_padding_mask: Optional[torch.Tensor], causal: bool, num_queries: int, num_keys: int,
            start: int, rows: int, device: torch.device) -> Optional[torch.Tensor]:
    """Which (row, key) scores of rows [start, start + rows) are hidden, broadcastable to (B, H, rows, Nk)."""
    hidden = None
    if key_padding_mask is not None:
        hidden = key_padding_mask[:, None, None, :]
    if causal:
        triangle = causal_hidden(num_queries, num_keys, device, start, rows)[None, None]
        hidden = triangle if hidden is None else hidden | triangle
    return hidden


def _scores(q_rows: torch.Tensor, k: torch.Tensor, scale: float, hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """Float32 scores of a chunk of rows, hidden ones -inf."""
    scores = torch.matmul(q_rows, k.transpose(-2, -1)).float().mul_(scale)
    if hidden is not None:
        scores.masked_fill_(hidden, float("-inf"))
    return scores


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale, causal, chunk_rows):
        batch, heads, num_queries, _ = q.shape
        num_keys = k.shape[2]
        out = q.new_empty(batch, heads, num_queries, v.shape[-1])
        lse = q.new_empty(batch, heads, num_queries, dtype=torch.float32)
        for start in range(0, num_queries, chunk_rows):
            rows = min(chunk_rows, num_queries - start)
            hidden = _hidden(key_padding_mask, causal, num_queries, num_keys, start, rows, q.device)
            scores = _scores(q[:, :, start:start + rows], k, scale, hidden)
            row_max = scores.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            weights = scores.sub_(row_max).exp_()  # in place: the chunk's one float32 buffer
            total = weights.sum(dim=-1, keepdim=True)
            unnormalised = torch.matmul(weights.to(v.dtype), v)
            out[:, :, start:start + rows] = (unnormalised.float() / torch.where(total > 0, total, 1.0)).to(out.dtype)
            lse[:, :, start:start + rows] = (row_max + torch.log(total)).squeeze(-1)  # -inf where no key is seen
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.scale, ctx.causal, ctx.chunk_rows = scale, causal, chunk_rows
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        scale, causal, chunk_rows = ctx.scale, ctx.causal, ctx.chunk_rows
        num_queries, num_keys = q.shape[2], k.shape[2]
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dout = dout.to(out.dtype)
        for start in range(0, num_queries, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_queries))
            hidden = _hidden(key_padding_mask, causal, num_queries, num_keys, start, rows.stop - start, q.device)
            q_rows, dout_rows = q[:, :, rows], dout[:, :, rows]
            # Rows that see no key have lse = -inf: +inf there makes their probabilities 0.
            row_lse = lse[:, :, rows, None]
            row_lse = torch.where(torch.isfinite(row_lse), row_lse, float("inf"))
            probs = _scores(q_rows, k, scale, hidden).sub_(row_lse).exp_()
            probs_low = probs.to(v.dtype)
            dv += torch.matmul(probs_low.transpose(-2, -1), dout_rows)
            del probs_low
            # dS = P * (dP - Delta), Delta = rowsum(dO * O): the softmax's backward.
            delta = (dout_rows.float() * out[:, :, rows].float()).sum(dim=-1, keepdim=True)
            grad_scores = probs.mul_(torch.matmul(dout_rows, v.transpose(-2, -1)).float().sub_(delta)).mul_(scale)
            grad_scores = grad_scores.to(q.dtype)
            dq[:, :, rows] = torch.matmul(grad_scores, k)
            dk += torch.matmul(grad_scores.transpose(-2, -1), q_rows)
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


__all__ = ["SCORE_CHUNK_BYTES", "chunked_attention", "rows_per_chunk"]
