"""The Triton kernels as a backend's forward and backward: what they serve and how they run.

Head dims up to 256 run on the narrow kernels (each head dim padded to a power of two
and held whole); wider ones on the wide kernels, which sum over the head dims in chunks
and cut what they write into slices (tiling.py). The launchers are imported at the
first launch or explanation, so importing the package compiles nothing.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .. import machine
from ..backends.base import Backward, Capabilities, Forward
from ..problem import Call, Problem
from .tiling import WIDE_MAX_HEAD_DIM

CAPABILITIES = Capabilities(max_head_dim=WIDE_MAX_HEAD_DIM, causal=True)


@machine.machine_fact
def _machine_refusal(device_type: str) -> str:
    """Why Triton cannot run on tensors of this device type here, or ""."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; wheels exist for Linux)"
    from .kernels.common import INTERPRETED, interpreter_mismatch

    mismatch = interpreter_mismatch()
    if mismatch:
        return mismatch
    if device_type == "cpu" and not INTERPRETED:
        return "tensors are on cpu; Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for testing)"
    if device_type not in ("cpu", "cuda"):
        return f"tensors are on {device_type}; Triton kernels need a CUDA GPU"
    return ""


def _bfloat16_refusal(problem: Problem) -> str:
    architecture = machine.architecture(problem.device.type, problem.device.index)
    if architecture == machine.INTERPRETER:
        return "bfloat16 tl.dot gives wrong results in the Triton interpreter"
    if machine.capability(architecture) < 80:
        return "bfloat16 needs compute capability 8.0 or newer"
    return ""


class _TritonImplementation:
    name = "triton"
    capabilities = CAPABILITIES

    def machine_refusal(self, problem: Problem) -> str:
        return _machine_refusal(problem.device.type)

    def own_refusals(self, problem: Problem) -> list[str]:
        refusal = _bfloat16_refusal(problem) if problem.dtype == torch.bfloat16 else ""
        return [refusal] if refusal else []


@functools.cache
def _launchers():
    """The launcher modules, imported at the first launch or explanation (they import triton
    and the kernels); a function-level import on every call would cost microseconds."""
    from . import backward, forward

    return forward, backward


class TritonForward(_TritonImplementation, Forward):
    """The forward kernels (triton/forward.py: the timed ones, or an untimed rewrite)."""

    def describe(self, problem: Problem) -> str:
        return _launchers()[0].plan_forward(problem).describe(problem)

    def launch(self, call: Call):
        return _launchers()[0].plan_forward(call.problem).launch(call)


class TritonBackward(_TritonImplementation, Backward):
    """The backward kernels (triton/backward.py); deterministic (partials summed in a fixed
    order, no atomics)."""

    def describe(self, problem: Problem) -> str:
        return _launchers()[1].plan_backward(problem).describe()

    def launch(self, call: Call, dout, out, lse):
        return _launchers()[1].plan_backward(call.problem).launch(call, dout, out, lse)


FORWARD = TritonForward()
BACKWARD = TritonBackward()
