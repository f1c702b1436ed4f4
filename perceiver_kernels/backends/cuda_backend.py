"""The "cuda" backend: hand-written CUDA C++ kernels in perceiver_kernels._C."""

from __future__ import annotations

import importlib.util

import torch

from .. import cuda_extension
from ..problem import Problem
from .base import Backend
from .triton_backend import TritonBackend

# Training runs the Triton backward (narrow or wide kernels): the widest head it takes.
TRITON_BACKWARD_MAX_HEAD_DIM = TritonBackend.max_head_dim

# On the H200 (benchmarks/results/2026-12-01-h200-run2, bf16) these kernels passed every
# GPU test but ran 0.21-0.90x of SDPA's best backend on every unmasked shape, narrow or
# wide, and slower than the Triton kernels except on wide heads (where the torch
# backend's chunked products are faster still); they won only on ENC-3 masked (2.44x
# SDPA, Triton 5.52x). So "auto" leaves them out.
SLOWER_THAN_THE_OTHERS = ("auto does not choose the CUDA kernels: on an H200 they were correct but slower than "
                          "SDPA or the Triton kernels on every measured shape "
                          "(benchmarks/results/2026-12-01-h200-run2); backend='cuda' runs them")


class CudaBackend(Backend):
    """Forward kernels in CUDA C++ (fp16/bf16 on tensor cores, fp32 exact on CUDA cores).

    Head dims: the compiled pairs (smaller dims run padded up to one), and beyond them the
    wide kernels up to the bound build_info() reports (1280), rounded up to a multiple of
    16. Training works where the Triton backward does (head dims up to 1280, triton
    installed): the backward runs in Triton from the forward's lse, causal masking
    included. The grid limit comes from the extension itself (build_info).
    """

    name = "cuda"
    causal = True
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
        if problem.requires_grad:
            if importlib.util.find_spec("triton") is None:
                reasons.append("gradients come from the Triton backward, and triton is not installed")
            if max(problem.head_dim_qk, problem.head_dim_v) > TRITON_BACKWARD_MAX_HEAD_DIM:
                reasons.append("gradients come from the Triton backward, which takes head dims up to "
                               f"{TRITON_BACKWARD_MAX_HEAD_DIM}; "
                               f"Dqk={problem.head_dim_qk} Dv={problem.head_dim_v} runs forward only")
        if auto:
            reasons.append(SLOWER_THAN_THE_OTHERS)
        return reasons

    def describe(self, problem: Problem) -> str:
        from ..cuda_launch import plan_cuda_forward

        plan = plan_cuda_forward(problem.batch, problem.heads, problem.num_queries, problem.num_keys, problem.dtype,
                                 problem.device, head_dim_v=problem.head_dim_v)
        kernel = "fp32 CUDA-core kernel" if problem.dtype == torch.float32 else "tensor-core kernel (mma.sync)"
        return f"cuda ({kernel}; {plan.describe()})"

    def run(self, q, k, v, key_padding_mask, residual, scale, dropout_p, causal):
        from .. import ops

        return ops.attention("cuda", q, k, v, key_padding_mask, residual, scale,
                             torch.backends.cuda.matmul.allow_tf32, causal)
