"""The "triton" backend: the fused Triton kernels (split-KV ENCODE, tiled DECODE), with
wide-head variants for head dims above 256."""

from __future__ import annotations

import importlib.util

import torch

from ..machine_facts import machine_fact
from ..problem import Problem
from .auto_policy import sdpa_faster_reason
from .base import Backend


@machine_fact
def _machine_refusal(device_type: str) -> str:
    """Why Triton cannot run on tensors of this device type here, or ""."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; wheels exist for Linux)"
    from ..kernels.common import INTERPRETED, interpreter_mismatch

    mismatch = interpreter_mismatch()
    if mismatch:
        return mismatch
    if device_type == "cpu" and not INTERPRETED:
        return "tensors are on cpu; Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for testing)"
    if device_type not in ("cpu", "cuda"):
        return f"tensors are on {device_type}; Triton kernels need a CUDA GPU"
    return ""


@machine_fact
def _bfloat16_refusal(device_type: str, device_index: int | None) -> str:
    from ..kernels.common import INTERPRETED

    if device_type == "cpu" and INTERPRETED:
        return "bfloat16 tl.dot gives wrong results in the Triton interpreter"
    if device_type == "cuda" and torch.cuda.get_device_capability(device_index) < (8, 0):
        return "bfloat16 needs compute capability 8.0 or newer"
    return ""


class TritonBackend(Backend):
    """Forward and backward (training) in Triton; deterministic (no atomics).

    Head dims up to 256 run on the narrow kernels (each head dim padded to a power of two
    and held whole); wider ones on the wide kernels, which sum over the head dims in
    chunks and cut what they write into slices, so no bound follows from registers or
    shared memory. 1280 is the widest the contract suites and the compile check cover
    (the released Perceiver IO models' widest heads).
    """

    name = "triton"
    max_head_dim = 1280
    causal = True
    backward_needs_plain_output = True

    def machine_refusal(self, problem: Problem, *, auto: bool) -> str:
        return _machine_refusal(problem.device.type)

    def own_refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        reasons = []
        if auto and problem.device.type == "cpu":
            reasons.append("on cpu Triton runs in its interpreter (TRITON_INTERPRET=1): correct but slow, "
                           "so only an explicit backend='triton' uses it")
        elif auto:
            slower = sdpa_faster_reason(problem)
            if slower:
                reasons.append(slower)
        if problem.dtype == torch.bfloat16:
            bfloat16 = _bfloat16_refusal(problem.device.type, problem.device.index)
            if bfloat16:
                reasons.append(bfloat16)
        return reasons

    def describe(self, problem: Problem) -> str:
        from ..triton_launch import (backward_variant, describe_head_dims, is_exact_fp32, plan_triton_backward,
                                     plan_triton_forward)

        exact_fp32 = is_exact_fp32(problem.dtype, torch.backends.cuda.matmul.allow_tf32)
        plan = plan_triton_forward(problem.batch, problem.heads, problem.num_queries, problem.num_keys,
                                   problem.head_dim_qk, problem.head_dim_v, problem.device, exact_fp32=exact_fp32)
        path = plan.describe()
        head_dims = describe_head_dims(problem.head_dim_qk, problem.head_dim_v)
        if head_dims:
            path += f"; {head_dims}"
        if problem.requires_grad:
            backward = plan_triton_backward(problem.batch, problem.heads, problem.num_queries, problem.num_keys,
                                            problem.head_dim_qk, problem.head_dim_v, problem.dtype.itemsize,
                                            problem.device, exact_fp32, problem.has_mask, None, backward_variant(),
                                            problem.causal)
            path += f"; {backward.describe()}"
        return f"triton ({path})"

    def run(self, q, k, v, key_padding_mask, residual, scale, dropout_p, causal):
        from .. import ops

        return ops.attention("triton", q, k, v, key_padding_mask, residual, scale,
                             torch.backends.cuda.matmul.allow_tf32, causal)
