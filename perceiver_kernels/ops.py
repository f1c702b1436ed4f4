"""torch.library registration of the fused kernels.

Each kernel entry point is a custom op with a fake (meta) implementation, so
torch.compile traces a model that calls it without looking inside the kernels. The
forwards (Triton and CUDA C++) return the log-sum-exp beside the output for the
backward, the Triton backward, which is itself a registered op:
`torch.compile(fullgraph=True)` traces training steps too.
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
    from .triton_launch import run_triton_forward

    return run_triton_forward(q, k, v, key_padding_mask, residual, scale, allow_tf32)


@triton_forward.register_fake
def _(q, k, v, key_padding_mask, residual, scale, allow_tf32):
    return allocate_output(q, v.shape[-1])


@torch.library.custom_op("perceiver_kernels::triton_backward", mutates_args=())
def triton_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dq, dk, dv), laid out like q, k, v.

    With a fused residual, the attention output is recovered as out - residual, which
    is only as precise as the rounded output allows; the triton backend therefore
    does not fuse the residual when gradients are needed.
    """
    from .triton_launch import run_triton_backward

    return run_triton_backward(dout, q, k, v, key_padding_mask, residual, out, lse, scale, allow_tf32)


@triton_backward.register_fake
def _(dout, q, k, v, key_padding_mask, residual, out, lse, scale, allow_tf32):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("perceiver_kernels::cuda_forward", mutates_args=())
def cuda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA C++ forward on validated inputs: (out (B, H, Nq, Dv), lse (B, H, Nq) fp32).

    Its fp32 kernel is exact (no TF32); its gradients come from the Triton backward.
    """
    from .cuda_launch import run_cuda_forward

    return run_cuda_forward(q, k, v, key_padding_mask, residual, scale)


@cuda_forward.register_fake
def _(q, k, v, key_padding_mask, residual, scale):
    return allocate_output(q, v.shape[-1])


def _save_for_backward(ctx, inputs, output):
    q, k, v, key_padding_mask, residual, scale, allow_tf32 = inputs
    _save(ctx, q, k, v, key_padding_mask, residual, scale, allow_tf32, output)


def _save_cuda_forward_for_backward(ctx, inputs, output):
    q, k, v, key_padding_mask, residual, scale = inputs
    _save(ctx, q, k, v, key_padding_mask, residual, scale, torch.backends.cuda.matmul.allow_tf32, output)


def _save(ctx, q, k, v, key_padding_mask, residual, scale, allow_tf32, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, residual, out, lse)
    ctx.scale = scale
    ctx.allow_tf32 = allow_tf32


def _gradients(ctx, dout):
    q, k, v, key_padding_mask, residual, out, lse = ctx.saved_tensors
    dq, dk, dv = triton_backward(dout, q, k, v, key_padding_mask, residual, out, lse, ctx.scale, ctx.allow_tf32)
    # out = attention + residual, so the residual's gradient is dout itself.
    return dq, dk, dv, None, dout if residual is not None else None


def _triton_forward_backward(ctx, dout, _dlse):
    return *_gradients(ctx, dout), None, None


def _cuda_forward_backward(ctx, dout, _dlse):
    return *_gradients(ctx, dout), None


def _no_double_backward(ctx, ddq, ddk, ddv):
    raise RuntimeError(
        "double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., create_graph=True) then "
        "backward) is not supported by the fused kernels (nor by SDPA's fused kernels behind backend='torch'); "
        "perceiver_kernels.reference_attention is twice differentiable (it materialises the Nq x Nk scores)"
    )


def _mark_double_backward(ctx, inputs, output):
    pass


triton_forward.register_autograd(_triton_forward_backward, setup_context=_save_for_backward)
# Recorded only when the first backward itself builds a graph (create_graph=True), so
# that differentiating it again fails with this message instead of torch's generic one.
triton_backward.register_autograd(_no_double_backward, setup_context=_mark_double_backward)
cuda_forward.register_autograd(_cuda_forward_backward, setup_context=_save_cuda_forward_for_backward)
