"""The CUDA C++ kernels of perceiver_kernels._C as a backend's forward; the backend trains
through the Triton backward (declared in backends/__init__.py)."""

from __future__ import annotations

from ..backends.base import Capabilities, Forward
from ..problem import Call, Problem
from . import extension


class CudaForward(Forward):
    """Forward kernels in CUDA C++ (fp16/bf16 on tensor cores, fp32 exact on CUDA cores).

    Head dims: the compiled pairs (smaller dims run padded up to one), and beyond them the
    wide kernels up to the bound build_info() reports (1280), rounded up to a multiple of
    16. What the kernels can do (pairs, grid limits) comes from the extension itself.
    """

    name = "cuda"
    capabilities = Capabilities(causal=True)

    def machine_refusal(self, problem: Problem) -> str:
        built = extension.build_problem()
        if built:
            return built
        if problem.device.type != "cuda":
            return f"tensors are on {problem.device.type}; the CUDA kernels need CUDA tensors"
        return extension.runtime_problem()

    def own_refusals(self, problem: Problem) -> list[str]:
        reasons = [extension.architecture_problem(problem.device.index),
                   extension.head_dims_problem(problem.head_dim_qk, problem.head_dim_v)]
        batch_heads, limit = problem.batch * problem.heads, extension.build_info()["max_batch_heads"]
        if batch_heads > limit:
            reasons.append(f"B * H = {batch_heads} exceeds {limit} (one grid dimension)")
        return [reason for reason in reasons if reason]

    def describe(self, problem: Problem) -> str:
        from .launch import plan_forward

        kernel = "fp32 CUDA-core kernel" if problem.dtype.itemsize == 4 else "tensor-core kernel (mma.sync)"
        return f"{kernel}; {plan_forward(problem).describe()}"

    def launch(self, call: Call):
        from .launch import run_forward

        return run_forward(call)


FORWARD = CudaForward()
