"""Differentiating the kernel backends: one path for every (forward, backward) pair.

Eagerly, a kernel call goes through `_Attention` (a torch.autograd.Function calling the
launchers directly) when autograd records it, and straight to the forward's launcher
when it does not. Under torch.compile it goes through two torch.library custom ops,
`perceiver_kernels::forward` and `perceiver_kernels::backward`, with fake (meta)
implementations, so a compiled model or training step traces them without looking
inside the kernels. The ops name the backend whose kernels they run; backends register
themselves here (backends/base.KernelBackend).

Both paths save the same tensors and return the same gradients. The residual never
reaches them with gradients wanted (KernelBackend.run adds it outside), so the backward
reads the attention output alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernel_launch import allocate_output
from .problem import Call, describe_tensors

_BACKENDS: dict = {}  # name -> the KernelBackend whose forward and backward the ops run


def register(backend) -> None:
    """Makes a kernel backend's forward and backward reachable by name from the custom ops."""
    _BACKENDS[backend.name] = backend


def _call(q, k, v, key_padding_mask, residual, scale: float, causal: bool, tf32: bool) -> Call:
    """The Call of an op's tensors, validated when the traced call was."""
    problem = describe_tensors(q, k, v, key_padding_mask, residual, scale, causal, False, tf32=tf32)
    return Call(problem, q, k, v, key_padding_mask, residual)


@torch.library.custom_op("perceiver_kernels::forward", mutates_args=())
def forward_op(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel backend's forward on validated inputs: (out (B, H, Nq, Dv), lse (B, H, Nq) fp32)."""
    return _BACKENDS[backend].forward.launch(_call(q, k, v, key_padding_mask, residual, scale, causal, tf32))


@forward_op.register_fake
def _(backend, q, k, v, key_padding_mask, residual, scale, causal, tf32):
    return allocate_output(q, v.shape[-1])


@torch.library.custom_op("perceiver_kernels::backward", mutates_args=())
def backward_op(
    backend: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A kernel backend's backward: (dq, dk, dv), laid out like q, k, v."""
    call = _call(q, k, v, key_padding_mask, None, scale, causal, tf32)
    return _BACKENDS[backend].backward.launch(call, dout, out, lse)


@backward_op.register_fake
def _(backend, dout, q, k, v, key_padding_mask, out, lse, scale, causal, tf32):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, backend: str, call: Call, out: torch.Tensor, lse: torch.Tensor) -> None:
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(call.q, call.k, call.v, call.key_padding_mask, out, lse)
    ctx.backend, ctx.problem = backend, call.problem


def _gradients(ctx, dout: torch.Tensor, eager: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv through the backward op, or (`eager`) the launcher directly unless the
    backward itself is being recorded (create_graph=True), where the op's own autograd
    refuses a second derivative."""
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    problem = ctx.problem
    if not eager or torch.is_grad_enabled():
        return backward_op(ctx.backend, dout, q, k, v, key_padding_mask, out, lse, problem.scale, problem.causal,
                           problem.tf32)
    call = Call(problem, q, k, v, key_padding_mask, None)
    return _BACKENDS[ctx.backend].backward.launch(call, dout, out, lse)


def _setup_forward_op(ctx, inputs, output):
    backend, q, k, v, key_padding_mask, residual, scale, causal, tf32 = inputs
    if residual is not None:
        raise RuntimeError("perceiver_kernels::forward differentiates the attention alone: call it without a "
                           "residual when gradients are wanted, and add the residual outside")
    _save(ctx, backend, _call(q, k, v, key_padding_mask, None, scale, causal, tf32), *output)


def _forward_op_backward(ctx, dout, _dlse):
    return None, *_gradients(ctx, dout, eager=False), None, None, None, None, None


def _no_double_backward(ctx, ddq, ddk, ddv):
    raise RuntimeError(
        "double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., create_graph=True) then "
        "backward) is not supported by the fused kernels (nor by SDPA's fused kernels behind backend='torch'); "
        "perceiver_kernels.reference_attention is twice differentiable (it materialises the Nq x Nk scores)"
    )


forward_op.register_autograd(_forward_op_backward, setup_context=_setup_forward_op)
# Recorded only when the first backward itself builds a graph (create_graph=True), so
# that differentiating it again fails with this message instead of torch's generic one.
backward_op.register_autograd(_no_double_backward)


class _Attention(torch.autograd.Function):
    """A kernel forward in eager mode with the custom ops' autograd, without their dispatch.

    Going through a torch.library op costs about 15 us of host time a call (on a 2-core
    CPU), more than the validation, dispatch and launcher together; in eager mode the
    op's tracing machinery buys nothing, so the launchers run directly.
    """

    @staticmethod
    def forward(ctx, backend, call, q, k, v):
        out, lse = _BACKENDS[backend].forward.launch(call)
        _save(ctx, backend, call, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        return None, None, *_gradients(ctx, dout, eager=True)


def attention(backend, call: Call) -> torch.Tensor:
    """The output of a kernel backend's forward on a call, differentiable through its
    backward, at the lowest host cost the mode allows."""
    if torch.compiler.is_compiling():
        problem = call.problem
        return forward_op(backend.name, call.q, call.k, call.v, call.key_padding_mask, call.residual,
                          problem.scale, problem.causal, problem.tf32)[0]
    if call.problem.requires_grad:
        return _Attention.apply(backend.name, call, call.q, call.k, call.v)[0]
    return backend.forward.launch(call)[0]
