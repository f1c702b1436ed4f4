"""torch.library registration of the fused kernels.

Each kernel backend is one custom op with a fake (meta) implementation, so
torch.compile traces a model that calls it without looking inside the kernels.
The op returns the log-sum-exp beside the output: the backward pass needs it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .problem import allocate_output


@torch.library.custom_op("perceiver_kernels::triton_forward", mutates_args=())
def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on validated inputs: (out (B, H, Nq, Dv), lse (B, H, Nq) fp32)."""
    from .triton_forward import attention_forward

    return attention_forward(q, k, v, key_padding_mask, residual, scale, allow_tf32)


@triton_forward.register_fake
def _triton_forward_fake(q, k, v, key_padding_mask, residual, scale, allow_tf32):
    return allocate_output(q, v.shape[-1])
