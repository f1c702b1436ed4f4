"""What a backend is: what it supports (as data), why it refuses a problem, and a forward."""

from __future__ import annotations

from typing import Optional

import torch

from ..problem import Problem, needs_grad

DROPOUT_NOT_FUSED = "attention dropout is not fused: dropout_p > 0 runs on backend='torch' (SDPA)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Backend:
    """One way to compute cross_attention.

    A subclass states what it supports in the class attributes below; refusals() turns
    them into readable reasons, and the subclass adds only reasons of its own
    (own_refusals) and what it needs from the machine (machine_refusal). An empty list
    of reasons means it can serve the problem. `auto` is True when dispatch is choosing
    by itself: a backend may decline then (a correct but slow testing path, a kernel
    slower than another backend on this shape) and still serve an explicit request.
    """

    name: str = ""
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    max_head_dim: Optional[int] = None  # None: no bound (or bounds stated by own_refusals)
    dropout: bool = False
    causal: bool = False  # causal masking (cross_attention's causal=True)
    empty_dimensions: bool = False  # B, H, Nq or Nk may be 0
    max_batch_heads: Optional[int] = None
    # The backward needs the attention output alone: with a residual and gradients
    # wanted, forward() runs without it and adds it outside (see forward()).
    backward_needs_plain_output: bool = False

    def refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        machine = self.machine_refusal(problem, auto=auto)
        if machine:
            return [machine]
        return self.declared_refusals(problem) + self.own_refusals(problem, auto=auto)

    def declared_refusals(self, problem: Problem) -> list[str]:
        """The reasons that follow from the class attributes."""
        reasons = []
        if problem.dtype not in self.dtypes:
            supported = ", ".join(_dtype_name(dtype) for dtype in self.dtypes)
            reasons.append(f"{_dtype_name(problem.dtype)} is not supported ({supported} are)")
        if self.max_head_dim is not None and max(problem.head_dim_qk, problem.head_dim_v) > self.max_head_dim:
            reasons.append(
                f"head dims up to {self.max_head_dim} are supported, got Dqk={problem.head_dim_qk} "
                f"Dv={problem.head_dim_v} (the tiles of larger heads do not fit in registers and shared memory)"
            )
        if problem.dropout and not self.dropout:
            reasons.append(DROPOUT_NOT_FUSED)
        if problem.causal and not self.causal:
            reasons.append(f"causal masking is not in the {self.name} kernels")
        if not self.empty_dimensions and 0 in (problem.batch, problem.heads, problem.num_queries, problem.num_keys):
            reasons.append("an empty dimension (B, H, Nq or Nk is 0): nothing to launch")
        batch_heads = problem.batch * problem.heads
        if self.max_batch_heads is not None and batch_heads > self.max_batch_heads:
            reasons.append(f"B * H = {batch_heads} exceeds {self.max_batch_heads} (one grid dimension)")
        return reasons

    def machine_refusal(self, problem: Problem, *, auto: bool) -> str:
        """Why this backend cannot run on this machine or device at all, or ""."""
        return ""

    def own_refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        """Reasons beyond the declared capabilities."""
        return []

    def describe(self, problem: Problem) -> str:
        """How this backend would run the problem (the kernel path), for explain()."""
        return self.name

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        residual: Optional[torch.Tensor],
        scale: float,
        dropout_p: float,
        causal: bool = False,
    ) -> torch.Tensor:
        if residual is not None and self.backward_needs_plain_output and needs_grad(q, k, v, residual):
            # Recovering the attention output as out - residual from the rounded output
            # would lose precision when the residual is large, so training adds it here.
            return self.run(q, k, v, key_padding_mask, None, scale, dropout_p, causal) + residual
        return self.run(q, k, v, key_padding_mask, residual, scale, dropout_p, causal)

    def run(self, q, k, v, key_padding_mask, residual, scale, dropout_p, causal) -> torch.Tensor:
        """The backend's computation on validated inputs it accepted."""
        raise NotImplementedError
