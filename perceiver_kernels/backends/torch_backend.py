"""The "torch" backend: PyTorch SDPA, serving every input on every device."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..problem import Problem
from ..reference import reference_attention
from .base import Backend


class TorchBackend(Backend):
    """SDPA where it fits; the exact reference where it does not (no keys at all).

    The only backend with attention dropout (SDPA's).

    Padding keys may hold anything, NaN and Inf included, yet must not reach the
    result: SDPA gives them weight 0 but still multiplies (0 * NaN = NaN) and adds
    its -inf bias to their scores (NaN - inf = NaN). So k and v are copied with their
    padding rows zeroed (one copy of each, the price of the contract on this path;
    the fused kernels never load padding rows), which also leaves those rows' input
    gradients exactly zero. SDPA's handling of rows whose keys are all padding differs
    between its kernels (0 on some, NaN on others), so those rows never reach it:
    their keys are unmasked for the call and their output is zeroed afterwards, which
    also gives them exactly zero gradients.
    """

    name = "torch"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    dropout = True
    empty_dimensions = True

    def describe(self, problem: Problem) -> str:
        if problem.num_keys == 0:
            return "torch (exact reference: no keys)"
        return "torch (scaled_dot_product_attention)"

    def run(self, q, k, v, key_padding_mask: Optional[torch.Tensor], residual, scale, dropout_p):
        if k.shape[2] == 0:
            return reference_attention(q, k, v, key_padding_mask=key_padding_mask, residual=residual, scale=scale)
        attn_mask = None
        if key_padding_mask is not None:
            padding_rows = key_padding_mask[:, None, :, None]
            k, v = k.masked_fill(padding_rows, 0.0), v.masked_fill(padding_rows, 0.0)
            all_padding = key_padding_mask.all(dim=1)
            attend = ~key_padding_mask | all_padding[:, None]
            attn_mask = attend[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        if key_padding_mask is not None:
            out = out.masked_fill(all_padding[:, None, None, None], 0.0)
        if residual is not None:
            out = out + residual
        return out
