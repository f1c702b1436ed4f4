"""The "torch" backend: PyTorch itself, serving every input on every device.

SDPA where it fits (torch/sdpa.py); on a GPU, the routes policy.torch_route measured
faster than SDPA's own choice (matrix products in query chunks for heads SDPA has no
fused kernel for, torch/chunked.py; flash first on shapes cuDNN does not split); the
exact reference when there are no keys at all. The only backend with attention dropout.
"""

from __future__ import annotations

import torch

from .. import policy
from ..backends.base import Backend
from ..problem import Call, Problem
from ..reference import reference_attention
from .chunked import chunked_attention
from .sdpa import sdpa_attention


def _route(problem: Problem) -> str:
    route = policy.torch_route(problem)
    if route == policy.CHUNKED and torch.compiler.is_compiling():
        # The chunked path's backward runs autograd inside autograd, which a traced graph
        # does not take: compiled models keep SDPA's math path for wide heads.
        return policy.SDPA_DEFAULT
    return route


class TorchBackend(Backend):
    name = "torch"

    def describe(self, problem: Problem) -> str:
        if problem.num_keys == 0:
            return "torch (exact reference: no keys)"
        route = policy.torch_route(problem)
        if route == policy.CHUNKED:
            return (f"torch ({policy.CHUNKED}: heads over {policy.SDPA_FUSED_MAX_HEAD_DIM} channels; "
                    "scaled_dot_product_attention under torch.compile)")
        if route == policy.FLASH_FIRST:
            return "torch (scaled_dot_product_attention, flash first: too few query blocks to fill the GPU)"
        return "torch (scaled_dot_product_attention)"

    def run(self, call: Call) -> torch.Tensor:
        problem, q, k, v, key_padding_mask, residual = call
        if problem.num_keys == 0:
            return reference_attention(q, k, v, key_padding_mask=key_padding_mask, residual=residual,
                                       scale=problem.scale, causal=problem.causal)
        if key_padding_mask is not None:
            # One copy of k and v with their padding rows zeroed: the price of the contract
            # (padding never leaks) on this path; the fused kernels never load padding rows.
            padding_rows = key_padding_mask[:, None, :, None]
            k, v = k.masked_fill(padding_rows, 0.0), v.masked_fill(padding_rows, 0.0)
        route = _route(problem)
        if route == policy.CHUNKED:
            out = chunked_attention(q, k, v, key_padding_mask, problem.scale, problem.causal)
        else:
            out = sdpa_attention(q, k, v, key_padding_mask, problem.scale, problem.dropout_p, problem.causal,
                                 flash_first=route == policy.FLASH_FIRST)
        return out if residual is None else out + residual
