"""The "torch" backend: PyTorch SDPA, serving every input on every device."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..problem import Problem
from ..reference import causal_hidden, reference_attention
from .base import Backend


class TorchBackend(Backend):
    """SDPA where it fits; the exact reference where it does not (no keys at all).

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
        return "torch (scaled_dot_product_attention)"

    def run(self, q, k, v, key_padding_mask: Optional[torch.Tensor], residual, scale, dropout_p, causal):
        if k.shape[2] == 0:
            return reference_attention(q, k, v, key_padding_mask=key_padding_mask, residual=residual, scale=scale,
                                       causal=causal)
        if key_padding_mask is not None:
            padding_rows = key_padding_mask[:, None, :, None]
            k, v = k.masked_fill(padding_rows, 0.0), v.masked_fill(padding_rows, 0.0)
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
