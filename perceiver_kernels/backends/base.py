"""What a backend is: what it serves (declared as data), why it refuses a problem, and how it runs.

A kernel backend is a pair: a forward and, for training, a backward, each an
`Implementation` that declares its capabilities; a backend may borrow another's backward
(the CUDA forward trains through the Triton backward). The torch backend is PyTorch
itself and serves everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import autograd
from ..problem import Call, Problem

DROPOUT_NOT_FUSED = "attention dropout is not fused: dropout_p > 0 runs on backend='torch' (SDPA)"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Capabilities:
    """What an implementation serves, as data; `refusals` turns it into readable reasons."""

    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
    max_head_dim: Optional[int] = None  # None: no bound (or bounds stated by own_refusals)
    dropout: bool = False
    causal: bool = False  # causal masking (cross_attention's causal=True)
    empty_dimensions: bool = False  # B, H, Nq or Nk may be 0

    def refusals(self, problem: Problem, name: str) -> list[str]:
        reasons = []
        if problem.dtype not in self.dtypes:
            supported = ", ".join(_dtype_name(dtype) for dtype in self.dtypes)
            reasons.append(f"{_dtype_name(problem.dtype)} is not supported ({supported} are)")
        if self.max_head_dim is not None and problem.max_head_dim > self.max_head_dim:
            reasons.append(
                f"head dims up to {self.max_head_dim} are supported, got Dqk={problem.head_dim_qk} "
                f"Dv={problem.head_dim_v} (the widest heads these kernels are tested for)"
            )
        if problem.dropout and not self.dropout:
            reasons.append(DROPOUT_NOT_FUSED)
        if problem.causal and not self.causal:
            reasons.append(f"causal masking is not in the {name} kernels")
        if not self.empty_dimensions and 0 in (problem.batch, problem.heads, problem.num_queries, problem.num_keys):
            reasons.append("an empty dimension (B, H, Nq or Nk is 0): nothing to launch")
        return reasons


class Implementation:
    """One direction (forward or backward) of a kernel backend.

    A subclass declares `capabilities`, and adds what it needs from the machine
    (machine_refusal) and reasons of its own (own_refusals). An empty list of reasons
    means it can serve the problem.
    """

    name: str = ""
    capabilities = Capabilities()

    def refusals(self, problem: Problem) -> list[str]:
        machine = self.machine_refusal(problem)
        if machine:
            return [machine]
        return self.capabilities.refusals(problem, self.name) + self.own_refusals(problem)

    def machine_refusal(self, problem: Problem) -> str:
        """Why this implementation cannot run on this machine or device at all, or ""."""
        return ""

    def own_refusals(self, problem: Problem) -> list[str]:
        """Reasons beyond the declared capabilities."""
        return []

    def describe(self, problem: Problem) -> str:
        """How it would run the problem (the kernel path), for explain()."""
        return self.name


class Forward(Implementation):
    def launch(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse in natural-log units) of a validated call it accepted."""
        raise NotImplementedError


class Backward(Implementation):
    def launch(self, call: Call, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of a call without residual, from its forward's out and lse."""
        raise NotImplementedError


class Backend:
    """One way to compute cross_attention: what it refuses, how it runs, and the run."""

    name: str = ""

    def refusals(self, problem: Problem) -> list[str]:
        """Why this backend cannot serve the problem; empty when it can."""
        return []

    def describe(self, problem: Problem) -> str:
        return self.name

    def run(self, call: Call) -> torch.Tensor:
        raise NotImplementedError


class KernelBackend(Backend):
    """A forward and a backward of fused kernels, trained through autograd.py."""

    def __init__(self, name: str, forward: Forward, backward: Backward):
        self.name, self.forward, self.backward = name, forward, backward
        autograd.register(self)

    def refusals(self, problem: Problem) -> list[str]:
        reasons = self.forward.refusals(problem)
        if problem.requires_grad:
            borrowed = self.backward.name != self.name
            for reason in self.backward.refusals(problem):
                if reason not in reasons:
                    reasons.append(f"gradients come from the {self.backward.name} backward: {reason}"
                                   if borrowed else reason)
        return reasons

    def describe(self, problem: Problem) -> str:
        path = self.forward.describe(problem)
        if problem.requires_grad:
            path += f"; {self.backward.describe(problem)}"
        return f"{self.name} ({path})"

    def run(self, call: Call) -> torch.Tensor:
        if call.residual is not None and call.problem.requires_grad:
            # The backward needs the attention output alone; recovering it as out -
            # residual from the rounded output would lose precision when the residual is
            # large, so training adds the residual here.
            return autograd.attention(self, call.without_residual()) + call.residual
        return autograd.attention(self, call)
