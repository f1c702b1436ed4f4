"""The "cuda" backend: hand-written CUDA C++ kernels in perceiver_kernels._C."""

from __future__ import annotations

from .. import cuda_extension
from ..problem import Problem
from .base import Backend


class CudaBackend(Backend):
    """Refuses every input until the extension carries attention kernels, and says why.

    It reports build and runtime problems already, so users learn early why it
    would not run on their machine.
    """

    name = "cuda"

    def refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        built = cuda_extension.build_problem()
        if built:
            return [built]
        if problem.device.type != "cuda":
            return [f"tensors are on {problem.device.type}; the CUDA kernels need CUDA tensors"]
        runtime = cuda_extension.runtime_problem()
        return [runtime] if runtime else []
