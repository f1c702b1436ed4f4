"""The "triton" backend: the fused Triton kernels (split-KV ENCODE, tiled DECODE)."""

from __future__ import annotations

import importlib.util

import torch

from ..machine import machine_fact
from ..problem import Problem, needs_grad
from .base import Backend

MAX_HEAD_DIM = 256


@machine_fact
def _machine_refusals(device_type: str, auto: bool) -> str:
    """Why Triton cannot run on tensors of this device type here, or ""."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; wheels exist for Linux)"
    from ..kernels.common import INTERPRETED, interpreter_mismatch

    mismatch = interpreter_mismatch()
    if mismatch:
        return mismatch
    if device_type == "cpu":
        if not INTERPRETED:
            return "tensors are on cpu; Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for testing)"
        if auto:
            return ("on cpu Triton runs in its interpreter (TRITON_INTERPRET=1): correct but slow, "
                    "so only an explicit backend='triton' uses it")
    elif device_type != "cuda":
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
    """Forward and backward (training) in Triton; deterministic (no atomics)."""

    name = "triton"

    def refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        machine = _machine_refusals(problem.device.type, auto)
        reasons = [machine] if machine else []
        if problem.dtype == torch.float64:
            reasons.append("float64 is not supported (float32, float16, bfloat16 are)")
        if problem.dtype == torch.bfloat16:
            bfloat16 = _bfloat16_refusal(problem.device.type, problem.device.index)
            if bfloat16:
                reasons.append(bfloat16)
        if max(problem.head_dim_qk, problem.head_dim_v) > MAX_HEAD_DIM:
            reasons.append(
                f"head dims up to {MAX_HEAD_DIM} are supported, got Dqk={problem.head_dim_qk} Dv={problem.head_dim_v} "
                "(the tiles of larger heads do not fit in registers and shared memory)"
            )
        if problem.dropout:
            reasons.append("attention dropout is not fused: dropout_p > 0 runs on backend='torch' (SDPA)")
        if 0 in (problem.batch, problem.heads, problem.num_queries, problem.num_keys):
            reasons.append("an empty dimension (B, H, Nq or Nk is 0): nothing to launch")
        return reasons

    def describe(self, problem: Problem) -> str:
        from ..triton_launch import is_exact_fp32, plan_forward

        plan = plan_forward(problem.batch, problem.heads, problem.num_queries, problem.num_keys,
                            problem.head_dim_qk, problem.head_dim_v, problem.device,
                            exact_fp32=is_exact_fp32(problem.dtype, torch.backends.cuda.matmul.allow_tf32))
        return f"triton ({plan.describe()})"

    def forward(self, q, k, v, key_padding_mask, residual, scale, dropout_p):
        from .. import ops

        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        if residual is not None and needs_grad(q, k, v, residual):
            # The backward needs the attention output alone; recovering it as
            # out - residual from the rounded output would lose precision when the
            # residual is large, so training adds the residual outside the kernel.
            out, _ = ops.triton_forward(q, k, v, key_padding_mask, None, scale, allow_tf32)
            return out + residual
        out, _ = ops.triton_forward(q, k, v, key_padding_mask, residual, scale, allow_tf32)
        return out
