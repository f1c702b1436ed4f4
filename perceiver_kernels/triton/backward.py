"""Launchers of the Triton backward kernels. The timed ones: Delta, then dK/dV over key
blocks and dQ over query blocks (the wide kernels' slices for heads over 256 channels),
each kernel's summed dimension cut into chunks where its programs are too few to fill
the GPU.

The plan of a Problem (and position of the variants switch) is cached
(`plan_backward`); explain() describes the same plan. The attention output the
backward reads is the forward's without a residual: the kernel backends add a residual
outside the kernels when gradients are wanted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from ..kernel_launch import cdiv, mask_operand, next_power_of_2, on_device, plan_chunks
from ..problem import Call, Problem
from . import configs, resident_backward, tiling, variants
from .delta import compute_delta, plan_delta
from .kernels.common import LOG2E


class BackwardPlan(Protocol):
    """How a problem's backward runs, decided once: what explain() says, and the launch."""

    def describe(self) -> str: ...

    def launch(self, call: Call, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


# Rewrites no GPU has timed yet (variants.py), tried in order when the switch says
# "untimed": each returns its plan for a problem and a forced chunk count, or None where
# it does not serve the problem (the timed kernels run it then).
UNTIMED: tuple[Callable[[Problem, Optional[int]], Optional[BackwardPlan]], ...] = (
    resident_backward.plan_encode, resident_backward.plan_decode)


def _block_rows(block_dqk: int, block_dv: int, exact_fp32: bool) -> int:
    """Rows of what one backward program writes. 64 rows let the dots use Hopper's wgmma
    (whose tiles have 64 rows); the two accumulators need 32 rows to fit registers when
    both heads are wide, and in exact fp32, whose dots hold their operands in registers
    (ptxas for sm_80 and sm_90, tests/triton_compile.py)."""
    return 32 if exact_fp32 or block_dqk + block_dv > 384 else 64


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str  # a name of configs: which kernel, and the config it gets
    chunks: int
    per_chunk: int
    grid: tuple
    meta: dict
    slices: int = 1  # programs per block: the wide kernels' slices of what they write


@dataclass(frozen=True)
class TwoKernelBackward:
    """The timed kernels: Delta, then the dK/dV and dQ kernels."""

    constexprs: dict
    dkdv: KernelLaunch
    dq: KernelLaunch
    delta: tuple[str, int, int]  # the Delta kernel, its rows and its block of Dv

    def describe(self) -> str:
        if self.dkdv.kernel == configs.BACKWARD_WIDE_DKDV:
            return (f"wide-head two-kernel backward (dK/dV over key blocks in {self.dkdv.slices} slices, dQ over "
                    f"query blocks in {self.dq.slices} slices)")
        return "two-kernel backward (dK/dV over key blocks, dQ over query blocks)"

    def launch(self, call: Call, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_two_kernels(self, call, dout, out, lse)


@functools.lru_cache(maxsize=4096)
def _plans(problem: Problem, num_chunks: Optional[int], variant: str) -> BackwardPlan:
    if variant == variants.UNTIMED:
        for planner in UNTIMED:
            plan = planner(problem, num_chunks)
            if plan is not None:
                return plan
    return _two_kernels(problem, num_chunks)


def plan_backward(problem: Problem, num_chunks: Optional[int] = None) -> BackwardPlan:
    """The plan of a problem's backward under the variants switch as it stands (num_chunks
    forces each kernel's chunk count: tests)."""
    return _plans(problem, num_chunks, variants.current)


plan_backward.cache_clear = _plans.cache_clear


def _two_kernels(problem: Problem, num_chunks: Optional[int]) -> TwoKernelBackward:
    constexprs = tiling.constexprs(problem)
    batch_heads = problem.batch * problem.heads
    # (kernel, blocks of, summed over, programs per block): dK/dV over key blocks summing
    # (a chunk of) the queries, dQ the mirror image.
    if tiling.is_wide(problem):
        block = tiling.WIDE_BACKWARD_ROWS
        constexprs["BLOCK_CHUNK_V"] = tiling.wide_chunk(problem.head_dim_v)
        constexprs["BLOCK_SLICE"] = tiling.WIDE_BACKWARD_SLICE
        kernels = ((configs.BACKWARD_WIDE_DKDV, problem.num_keys, problem.num_queries,
                    cdiv(problem.max_head_dim, tiling.WIDE_BACKWARD_SLICE)),
                   (configs.BACKWARD_WIDE_DQ, problem.num_queries, problem.num_keys,
                    cdiv(problem.head_dim_qk, tiling.WIDE_BACKWARD_SLICE)))
    else:
        block = _block_rows(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"], problem.exact_fp32)
        kernels = ((configs.BACKWARD_DKDV, problem.num_keys, problem.num_queries, 1),
                   (configs.BACKWARD_DQ, problem.num_queries, problem.num_keys, 1))
    constexprs["BLOCK_OUTER"] = block
    constexprs["CAUSAL"] = problem.causal
    launches = []
    for kernel, outer, inner, slices in kernels:
        programs = cdiv(outer, block) * slices * batch_heads
        chunks, per_chunk = plan_chunks(programs, inner, problem.device, num_chunks)
        meta, _ = configs.launch_meta(kernel, problem, constexprs, per_chunk, block)
        launches.append(KernelLaunch(kernel, chunks, per_chunk, (programs * chunks,), meta, slices))
    return TwoKernelBackward(constexprs, launches[0], launches[1], plan_delta(problem))


def run_backward(call: Call, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 num_chunks: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of a call from its forward's out (without residual) and lse.

    num_chunks forces the number of chunks of the summed dimension (tests); by default
    the plan picks it per kernel.
    """
    return plan_backward(call.problem, num_chunks).launch(call, dout, out, lse)


def _launch_two_kernels(plan: TwoKernelBackward, call: Call, dout: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem, q, k, v, key_padding_mask, _ = call
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pad, pad_strides = mask_operand(call)
    strides = (*q.stride(), *k.stride(), *v.stride(), *pad_strides, *dout.stride())
    sizes = (problem.heads, problem.num_queries, problem.num_keys, problem.head_dim_qk, problem.head_dim_v,
             problem.scale, problem.scale * LOG2E)

    def targets(gradients: tuple[torch.Tensor, ...], chunks: int) -> tuple[torch.Tensor, ...]:
        # One chunk writes the gradients in place; several write fp32 partials summed below.
        if chunks == 1:
            return tuple(g.unsqueeze(0) for g in gradients)
        return tuple(torch.empty((chunks, *g.shape), dtype=torch.float32, device=g.device) for g in gradients)

    def launch(kernel: KernelLaunch, inputs: tuple[torch.Tensor, ...], gradients: tuple[torch.Tensor, ...]) -> None:
        parts = targets(gradients, kernel.chunks)
        configs.kernel(kernel.kernel)[kernel.grid](
            *inputs, *parts, *strides, *(s for part in parts for s in part.stride()), *sizes,
            kernel.chunks, kernel.per_chunk, next_power_of_2(kernel.per_chunk), **plan.constexprs, **kernel.meta,
        )
        if kernel.chunks > 1:
            for gradient, part in zip(gradients, parts):
                gradient.copy_(part.sum(0))

    with on_device(q):
        inputs = (q, k, v, pad, dout, lse, compute_delta(problem, plan.delta, out, dout))
        launch(plan.dkdv, inputs, (dk, dv))
        launch(plan.dq, inputs, (dq,))
    return dq, dk, dv
