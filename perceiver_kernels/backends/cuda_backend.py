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
        info = cuda_extension.build_info()
        if not info["built"]:
            return [info["reason"]]
        reasons = []
        if not info["attention_kernels"]:
            reasons.append("this build of perceiver_kernels._C carries no attention kernels yet")
        if problem.device.type != "cuda":
            reasons.append(f"tensors are on {problem.device.type}; the CUDA kernels need CUDA tensors")
        else:
            runtime = cuda_extension.runtime_problem()
            if runtime:
                reasons.append(runtime)
        return reasons

