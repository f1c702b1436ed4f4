"""The exact reference: what every backend is tested against and the torch fallback.

It materialises the (Nq, Nk) score matrix, so it is for tests, benchmarks' baselines
and small problems; the "torch" backend uses SDPA, which does not.
"""

from __future__ import annotations

from typing import Optional

import torch


def reference_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, masked) v (+ residual) and the row log-sum-exp.

    Shapes as in cross_attention; returns out (B, H, Nq, Dv) and lse (B, H, Nq) in
    natural-log units. causal: query i sees key j only if j <= i + Nk - Nq (aligned
    at the bottom right, as the latents of Perceiver AR are the last positions of the
    keys). A row with every key masked gets out = 0 (+ residual) and lse = -inf. With
    upcast=True everything is computed and returned in float64 (the ground truth of
    the tests); otherwise in the dtype of q (the "plain PyTorch" error baseline of the
    tolerance rule).
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(causal_hidden(q.shape[2], k.shape[2], q.device), float("-inf"))
    # The row max only stabilises exp; detaching it keeps the gradient of all-masked
    # rows at exactly 0 (logsumexp's own backward is NaN there), and stand-ins of 0
    # for its -inf and of 1 for the zero denominator make those rows' output 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach() if scores.shape[-1] else scores.new_zeros(scores.shape[:-1] + (1,))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights / torch.where(denom > 0, denom, torch.ones_like(denom)), v)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    if residual is not None:
        out = out + residual.to(dtype)
    return out, lse.float() if not upcast else lse


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """The output of reference_attention_with_lse (see there)."""
    out, _ = reference_attention_with_lse(
        q, k, v, key_padding_mask=key_padding_mask, residual=residual, scale=scale, causal=causal, upcast=upcast
    )
    return out


def causal_hidden(num_queries: int, num_keys: int, device, first_query: int = 0, rows: Optional[int] = None
                  ) -> torch.Tensor:
    """(rows, Nk) bool, True where query first_query + r may not see key j: j > i + Nk - Nq."""
    rows = num_queries - first_query if rows is None else rows
    queries = torch.arange(first_query, first_query + rows, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] > queries + (num_keys - num_queries)
