"""cross_attention's contract on top of PyTorch's scaled_dot_product_attention.

Padding keys may hold anything, NaN and Inf included, yet must not reach the result:
SDPA gives them weight 0 but still multiplies (0 * NaN = NaN) and adds its -inf bias to
their scores (NaN - inf = NaN). So k and v arrive here with their padding rows zeroed
(torch/backend.py copies them), which also leaves those rows' input gradients exactly
zero. SDPA's handling of rows whose keys are all hidden (padding, or causally out of
reach) differs between its kernels (0 on some, NaN on others), so those rows never
reach it: their keys are unmasked for the call and their output is zeroed afterwards,
which also gives them exactly zero gradients.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..reference import causal_hidden

# Causal masks with padding are built for this many (batch, query, key) cells at a time.
CAUSAL_MASK_CELLS = 2**26


class _WithoutCudnn:
    """SDPA's cuDNN backend switched off for a block and back to what it was: two flag
    calls, half a microsecond, where the sdpa_kernel context costs about 11 us a call (on
    the project's 2-core CPU machine, torch 2.13), more than a small SDPA call itself.
    Dynamo traces sdpa_kernel, not the flags, so compiled code keeps the context."""

    def __enter__(self):
        self.enabled = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)

    def __exit__(self, *exception):
        torch.backends.cuda.enable_cudnn_sdp(self.enabled)


def _cudnn_left_out():
    # cuDNN left out rather than flash put first: sdpa_kernel(..., set_priority=True) left
    # its order in place after the context on the H200 (torch 2.11), and every later SDPA
    # call of the process took flash (run2: ENC-1 0.88 ms instead of 0.44).
    if torch.compiler.is_compiling():
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return _WithoutCudnn()


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   scale: float, dropout_p: float, causal: bool, flash_first: bool) -> torch.Tensor:
    """Attention through SDPA (k and v with zeroed padding rows); `flash_first`: cuDNN
    left out, so that SDPA takes flash where it would have taken cuDNN."""
    with _cudnn_left_out() if flash_first else contextlib.nullcontext():
        if causal:
            return _causal(q, k, v, key_padding_mask, scale, dropout_p)
        hidden = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return _sdpa(q, k, v, hidden, scale, dropout_p)


def _sdpa(q, k, v, hidden: Optional[torch.Tensor], scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA with a broadcastable bool mask of hidden keys; rows that see no key get 0."""
    if hidden is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    blind = hidden.all(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~hidden | blind, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(blind, 0.0)


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
