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

from .problem import allocate_output, needs_grad


@torch.library.custom_op("perceiver_kernels::triton_forward", mutates_args=())
def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    allow_tf32: bool,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on validated inputs: (out (B, H, Nq, Dv), lse (B, H, Nq) fp32)."""
    from .triton_launch import run_triton_forward

    return run_triton_forward(q, k, v, key_padding_mask, residual, scale, allow_tf32, causal=causal)


@triton_forward.register_fake
def _(q, k, v, key_padding_mask, residual, scale, allow_tf32, causal=False):
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
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dq, dk, dv), laid out like q, k, v.

    With a fused residual, the attention output is recovered as out - residual, which
    is only as precise as the rounded output allows; the triton backend therefore
    does not fuse the residual when gradients are needed.
    """
    from .triton_launch import run_triton_backward

    return run_triton_backward(dout, q, k, v, key_padding_mask, residual, out, lse, scale, allow_tf32, causal=causal)


@triton_backward.register_fake
def _(dout, q, k, v, key_padding_mask, residual, out, lse, scale, allow_tf32, causal=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("perceiver_kernels::cuda_forward", mutates_args=())
def cuda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA C++ forward on validated inputs: (out (B, H, Nq, Dv), lse (B, H, Nq) fp32).

    Its fp32 kernel is exact (no TF32); its gradients come from the Triton backward.
    """
    from .cuda_launch import run_cuda_forward

    return run_cuda_forward(q, k, v, key_padding_mask, residual, scale, causal=causal)


@cuda_forward.register_fake
def _(q, k, v, key_padding_mask, residual, scale, causal=False):
    return allocate_output(q, v.shape[-1])


def _save_for_backward(ctx, inputs, output):
    q, k, v, key_padding_mask, residual, scale, allow_tf32, causal = inputs
    _save(ctx, q, k, v, key_padding_mask, residual, scale, allow_tf32, output, causal)


def _save_cuda_forward_for_backward(ctx, inputs, output):
    q, k, v, key_padding_mask, residual, scale, causal = inputs
    _save(ctx, q, k, v, key_padding_mask, residual, scale, torch.backends.cuda.matmul.allow_tf32, output, causal)


def _save(ctx, q, k, v, key_padding_mask, residual, scale, allow_tf32, output, causal=False):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, residual, out, lse)
    ctx.scale = scale
    ctx.allow_tf32 = allow_tf32
    ctx.causal = causal


def _gradients(ctx, dout, eager: bool = False):
    """Gradients of q, k, v and residual. `eager`: the launcher runs directly, unless the
    backward itself is being recorded (create_graph=True), where the registered op's own
    autograd refuses a second derivative with a clear message."""
    q, k, v, key_padding_mask, residual, out, lse = ctx.saved_tensors
    args = (dout, q, k, v, key_padding_mask, residual, out, lse, ctx.scale, ctx.allow_tf32)
    if eager and not torch.is_grad_enabled():
        from .triton_launch import run_triton_backward

        dq, dk, dv = run_triton_backward(*args, causal=ctx.causal)
    else:
        dq, dk, dv = triton_backward(*args, ctx.causal)
    # out = attention + residual, so the residual's gradient is dout itself.
    return dq, dk, dv, None, dout if residual is not None else None


def _triton_forward_backward(ctx, dout, _dlse):
    return *_gradients(ctx, dout), None, None, None


def _cuda_forward_backward(ctx, dout, _dlse):
    return *_gradients(ctx, dout), None, None


def _no_double_backward(ctx, ddq, ddk, ddv):
    raise RuntimeError(
        "double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., create_graph=True) then "
        "backward) is not supported by the fused kernels (nor by SDPA's fused kernels behind backend='torch'); "
        "perceiver_kernels.reference_attention is twice differentiable (it materialises the Nq x Nk scores)"
    )


def _mark_double_backward(ctx, inputs, output):
    pass


class _EagerForward(torch.autograd.Function):
    """A kernel forward in eager mode with the custom ops' autograd, without their dispatch.

    Going through a torch.library op costs about 15 us of host time a call (on a 2-core
    CPU), more than the validation, dispatch and launcher together; in eager mode the
    op's tracing machinery buys nothing, so the launchers run directly. Same saved
    tensors and gradients as the registered ops (_save, _gradients).
    """

    @staticmethod
    def forward(ctx, launch, q, k, v, key_padding_mask, residual, scale, allow_tf32, causal):
        output = launch(q, k, v, key_padding_mask, residual, scale)
        _save(ctx, q, k, v, key_padding_mask, residual, scale, allow_tf32, output, causal)
        return output

    @staticmethod
    def backward(ctx, dout, _dlse):
        return None, *_gradients(ctx, dout, eager=True), None, None, None


def attention(kernel: str, q, k, v, key_padding_mask, residual, scale: float, allow_tf32: bool,
              causal: bool = False) -> torch.Tensor:
    """The output of a kernel forward ("triton" or "cuda"), differentiable, at the lowest
    host cost the mode allows: the registered custom op under torch.compile, the
    launcher behind _EagerForward when autograd records the call, the launcher alone
    otherwise."""
    if torch.compiler.is_compiling():
        if kernel == "triton":
            return triton_forward(q, k, v, key_padding_mask, residual, scale, allow_tf32, causal)[0]
        return cuda_forward(q, k, v, key_padding_mask, residual, scale, causal)[0]
    if kernel == "triton":
        from .triton_launch import run_triton_forward

        def launch(*args):
            return run_triton_forward(*args, allow_tf32, causal=causal)
    else:
        from .cuda_launch import run_cuda_forward

        def launch(*args):
            return run_cuda_forward(*args, causal=causal)
    if needs_grad(q, k, v, residual):
        return _EagerForward.apply(launch, q, k, v, key_padding_mask, residual, scale, allow_tf32, causal)[0]
    return launch(q, k, v, key_padding_mask, residual, scale)[0]


triton_forward.register_autograd(_triton_forward_backward, setup_context=_save_for_backward)
# Recorded only when the first backward itself builds a graph (create_graph=True), so
# that differentiating it again fails with this message instead of torch's generic one.
triton_backward.register_autograd(_no_double_backward, setup_context=_mark_double_backward)
cuda_forward.register_autograd(_cuda_forward_backward, setup_context=_save_cuda_forward_for_backward)
