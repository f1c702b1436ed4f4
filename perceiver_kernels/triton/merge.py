"""The split-KV forward's fp32 partials and their merge (merge_splits_kernel in
kernels/attention_fwd.py), shared by every forward that splits the keys: the timed split
kernels and the untimed ENCODE and wide forwards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernel_launch import cdiv
from ..problem import Problem
from . import configs


@dataclass(frozen=True)
class MergePlan:
    """The merge's grid and constexprs, fixed per Problem."""

    grid: tuple
    constexprs: dict


def plan_merge(problem: Problem, rows: int, block_dv: int, dependent_launch: bool = False) -> MergePlan:
    """A merge of `rows` query rows by `block_dv` channels per program; dependent_launch:
    launched with programmatic dependent launch (sm_90+), waiting on griddepcontrol for
    the split kernel, which must let it launch (LAUNCH_DEPENDENTS)."""
    programs = cdiv(problem.num_queries, rows) * cdiv(problem.head_dim_v, block_dv)
    constexprs = dict(HAS_RESIDUAL=problem.has_residual, BLOCK_M=rows, BLOCK_DV=block_dv)
    if dependent_launch:
        constexprs.update(WAIT_FOR_PRIMARY=True, launch_pdl=True)
    return MergePlan((programs * problem.batch * problem.heads,), constexprs)


def allocate_partials(problem: Problem, num_splits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits' fp32 outputs (B*H, splits, Nq, Dv) and log-sum-exps (B*H, splits, Nq)."""
    heads = problem.batch * problem.heads
    part_out = torch.empty((heads, num_splits, problem.num_queries, problem.head_dim_v), dtype=torch.float32,
                           device=device)
    part_lse = torch.empty((heads, num_splits, problem.num_queries), dtype=torch.float32, device=device)
    return part_out, part_lse


def launch_merge(plan: MergePlan, problem: Problem, num_splits: int, part_out: torch.Tensor, part_lse: torch.Tensor,
                 res: torch.Tensor, res_strides: tuple, out: torch.Tensor, lse: torch.Tensor) -> None:
    """out and lse (natural log) from the partials, plus the residual where the plan says."""
    configs.kernel(configs.MERGE)[plan.grid](
        part_out, part_lse, res, out, lse, *res_strides, *out.stride(),
        problem.heads, problem.num_queries, problem.head_dim_v, num_splits, **plan.constexprs,
    )
