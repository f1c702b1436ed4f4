"""The "cuda" backend: hand-written CUDA C++ kernels in perceiver_kernels._C."""

from __future__ import annotations

import importlib.util

import torch

from .. import cuda_extension
from ..problem import Problem, needs_grad
from .base import Backend

MAX_BATCH_HEADS = 65535  # one grid dimension of the kernels

# "auto" leaves these kernels out until they have been checked and timed on a GPU:
# they compile in CI but no GPU has run them yet (see benchmarks/results/).
NOT_YET_VALIDATED = ("auto does not choose the CUDA kernels: they have not yet been validated and timed "
                     "on a GPU; backend='cuda' runs them")


class CudaBackend(Backend):
    """Forward kernels in CUDA C++ (fp16/bf16 on tensor cores, fp32 exact on CUDA cores).

    Training works: the backward runs in Triton from the forward's lse, so it needs
    triton installed. Head dims are those of the compiled instantiations (smaller ones
    run padded up); other dims are refused with the list of compiled pairs.
    """

    name = "cuda"

    def refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        built = cuda_extension.build_problem()
        if built:
            return [built]
        if problem.device.type != "cuda":
            return [f"tensors are on {problem.device.type}; the CUDA kernels need CUDA tensors"]
        runtime = cuda_extension.runtime_problem()
        if runtime:
            return [runtime]
        reasons = []
        architecture = cuda_extension.architecture_problem(problem.device.index)
        if architecture:
            reasons.append(architecture)
        if problem.dtype == torch.float64:
            reasons.append("float64 is not supported (float32, float16, bfloat16 are)")
        head_dims = cuda_extension.head_dims_problem(problem.head_dim_qk, problem.head_dim_v)
        if head_dims:
            reasons.append(head_dims)
        if problem.dropout:
            reasons.append("attention dropout is not fused: dropout_p > 0 runs on backend='torch' (SDPA)")
        if 0 in (problem.batch, problem.heads, problem.num_queries, problem.num_keys):
            reasons.append("an empty dimension (B, H, Nq or Nk is 0): nothing to launch")
        if problem.batch * problem.heads > MAX_BATCH_HEADS:
            reasons.append(f"B * H = {problem.batch * problem.heads} exceeds {MAX_BATCH_HEADS} (one grid dimension)")
        if problem.requires_grad and importlib.util.find_spec("triton") is None:
            reasons.append("gradients come from the Triton backward, and triton is not installed")
        if auto:
            reasons.append(NOT_YET_VALIDATED)
        return reasons

    def describe(self, problem: Problem) -> str:
        from ..cuda_launch import plan_forward

        plan = plan_forward(problem.batch, problem.heads, problem.num_queries, problem.num_keys, problem.dtype,
                            problem.device)
        kernel = "fp32 CUDA-core kernel" if problem.dtype == torch.float32 else "tensor-core kernel (mma.sync)"
        return f"cuda ({kernel}; {plan.describe()})"

    def forward(self, q, k, v, key_padding_mask, residual, scale, dropout_p):
        from .. import ops

        if residual is not None and needs_grad(q, k, v, residual):
            # As in the triton backend: the backward needs the attention output alone,
            # so training adds the residual outside the kernel.
            out, _ = ops.cuda_forward(q, k, v, key_padding_mask, None, scale)
            return out + residual
        out, _ = ops.cuda_forward(q, k, v, key_padding_mask, residual, scale)
        return out
