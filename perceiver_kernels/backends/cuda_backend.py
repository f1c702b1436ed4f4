"""The "cuda" backend: hand-written CUDA C++ kernels in perceiver_kernels._C."""

from __future__ import annotations

import importlib.util

import torch

from .. import cuda_extension
from ..problem import Problem
from .base import Backend

# "auto" leaves these kernels out until they have been checked and timed on a GPU:
# they compile in CI but no GPU has run them yet (see benchmarks/results/).
NOT_YET_VALIDATED = ("auto does not choose the CUDA kernels: they have not yet been validated and timed "
                     "on a GPU; backend='cuda' runs them")


class CudaBackend(Backend):
    """Forward kernels in CUDA C++ (fp16/bf16 on tensor cores, fp32 exact on CUDA cores).

    Training works: the backward runs in Triton from the forward's lse, so it needs
    triton installed. Head dims are those of the compiled instantiations (smaller ones
    run padded up); other dims are refused with the list of compiled pairs. The grid
    limit comes from the extension itself (build_info).
    """

    name = "cuda"
    backward_needs_plain_output = True

    @property
    def max_batch_heads(self) -> int:
        return cuda_extension.build_info().get("max_batch_heads")

    def machine_refusal(self, problem: Problem, *, auto: bool) -> str:
        built = cuda_extension.build_problem()
        if built:
            return built
        if problem.device.type != "cuda":
            return f"tensors are on {problem.device.type}; the CUDA kernels need CUDA tensors"
        return cuda_extension.runtime_problem()

    def own_refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        reasons = []
        architecture = cuda_extension.architecture_problem(problem.device.index)
        if architecture:
            reasons.append(architecture)
        head_dims = cuda_extension.head_dims_problem(problem.head_dim_qk, problem.head_dim_v)
        if head_dims:
            reasons.append(head_dims)
        if problem.requires_grad and importlib.util.find_spec("triton") is None:
            reasons.append("gradients come from the Triton backward, and triton is not installed")
        if auto:
            reasons.append(NOT_YET_VALIDATED)
        return reasons

    def describe(self, problem: Problem) -> str:
        from ..cuda_launch import plan_cuda_forward

        plan = plan_cuda_forward(problem.batch, problem.heads, problem.num_queries, problem.num_keys, problem.dtype,
                                 problem.device)
        kernel = "fp32 CUDA-core kernel" if problem.dtype == torch.float32 else "tensor-core kernel (mma.sync)"
        return f"cuda ({kernel}; {plan.describe()})"

    def run(self, q, k, v, key_padding_mask, residual, scale, dropout_p):
        from .. import ops

        out, _ = ops.cuda_forward(q, k, v, key_padding_mask, residual, scale)
        return out
