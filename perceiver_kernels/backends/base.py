"""What a backend is: a name, what it refuses and why, and a forward function."""

from __future__ import annotations

from typing import Optional

import torch

from ..problem import Problem


class Backend:
    """One way to compute cross_attention.

    refusals() returns readable reasons why this backend cannot serve a problem (an
    empty list means it can). `auto` is True when dispatch is choosing by itself;
    a backend may decline then (e.g. a correct but slow testing path) and still
    serve an explicit request.
    """

    name: str = ""

    def refusals(self, problem: Problem, *, auto: bool) -> list[str]:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        residual: Optional[torch.Tensor],
        scale: float,
        dropout_p: float,
    ) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, problem: Problem) -> str:
        """How this backend would run the problem (the kernel path), for explain()."""
        return self.name
