"""The "triton" backend: the fused Triton kernels (split-KV ENCODE, tiled DECODE)."""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..problem import Problem
from .base import Backend

MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreted() -> bool:
    # The kernels decided interpreted or compiled when they were decorated; ask them.
    from ..kernels.attention_fwd import INTERPRETED

    return INTERPRETED


@functools.lru_cache(maxsize=None)
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class TritonBackend(Backend):
    """Forward only for now: training (inputs that require grad) goes to another backend."""

    name = "triton"

    def refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        if not _triton_installed():
            return ["triton is not installed (pip install triton; wheels exist for Linux)"]
        reasons = []
        device = problem.device.type
        if device == "cpu":
            if not _interpreted():
                reasons.append("tensors are on cpu; Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for testing)")
            elif auto:
                reasons.append("on cpu Triton runs in its interpreter (TRITON_INTERPRET=1): correct but slow, "
                               "so only an explicit backend='triton' uses it")
        elif device != "cuda":
            reasons.append(f"tensors are on {device}; Triton kernels need a CUDA GPU")
        if problem.dtype == torch.float64:
            reasons.append("float64 is not supported (float32, float16, bfloat16 are)")
        if problem.dtype == torch.bfloat16:
            if device == "cpu" and _interpreted():
                reasons.append("bfloat16 tl.dot gives wrong results in the Triton interpreter")
            elif device == "cuda" and _compute_capability(problem.device) < (8, 0):
                reasons.append("bfloat16 needs compute capability 8.0 or newer")
        if max(problem.head_dim_qk, problem.head_dim_v) > MAX_HEAD_DIM:
            reasons.append(
                f"head dims up to {MAX_HEAD_DIM} are supported, got Dqk={problem.head_dim_qk} Dv={problem.head_dim_v} "
                "(the tiles of larger heads do not fit in registers and shared memory)"
            )
        if 0 in (problem.batch, problem.heads, problem.num_queries, problem.num_keys):
            reasons.append("an empty dimension (B, H, Nq or Nk is 0): nothing to launch")
        if problem.requires_grad:
            reasons.append("no Triton backward kernels yet: inputs that require grad go to backend='torch'")
        return reasons

    def describe(self, problem: Problem) -> str:
        from ..triton_forward import plan_forward

        plan = plan_forward(problem.batch, problem.heads, problem.num_queries, problem.num_keys,
                            problem.head_dim_v, problem.device)
        return f"triton ({plan.describe()})"

    def forward(self, q, k, v, key_padding_mask, residual, scale):
        from .. import ops

        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        out, _ = ops.triton_forward(q, k, v, key_padding_mask, residual, scale, allow_tf32)
        return out
