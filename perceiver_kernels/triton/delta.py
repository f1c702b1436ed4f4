"""Delta_i = dO_i . O_i over the attention output (without residual): the row sums every
Triton backward starts from (kernels/attention_bwd.py: attention_bwd_delta_kernel, or its
wide twin), planned once per Problem and launched before the gradient kernels."""

from __future__ import annotations

import torch

from ..kernel_launch import cdiv, next_power_of_2
from ..problem import Problem
from . import configs, tiling


def plan_delta(problem: Problem) -> tuple[str, int, int]:
    """(kernel, rows per program, block of Dv). Delta reads all of Dv at once in a block of
    BLOCK_DV (32 rows from 256 channels, to stay in registers), or a wide Dv in chunks."""
    if problem.head_dim_v > tiling.NARROW_MAX_HEAD_DIM:
        return (configs.BACKWARD_WIDE_DELTA, *tiling.WIDE_DELTA_BLOCK)
    if tiling.is_wide(problem):  # a wide Dqk beside a narrow Dv
        block_dv = max(16, next_power_of_2(problem.head_dim_v))
    else:
        block_dv = tiling.head_dim_blocks(problem)[1]
    return configs.BACKWARD_DELTA, 32 if block_dv > 128 else 64, block_dv


def compute_delta(problem: Problem, plan: tuple[str, int, int], out: torch.Tensor, dout: torch.Tensor
                  ) -> torch.Tensor:
    """Delta (B*H, Nq) in fp32, from out and dout in their own dtype and strides."""
    kernel, rows, block_dv = plan
    delta = torch.empty((problem.batch * problem.heads, problem.num_queries), dtype=torch.float32,
                        device=out.device)
    configs.kernel(kernel)[(cdiv(problem.num_queries, rows) * problem.batch * problem.heads,)](
        out, dout, delta, *out.stride(), *dout.stride(), problem.heads, problem.num_queries, problem.head_dim_v,
        BLOCK_M=rows, BLOCK_DV=block_dv,
    )
    return delta
