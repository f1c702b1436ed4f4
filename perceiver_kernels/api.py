"""The public op: cross_attention, and explain() for the backend it would use."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import dispatch
from .problem import validate


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v (+ residual), for the asymmetric shapes of Perceiver IO.

    Args:
        q: (B, H, Nq, Dqk) queries, float32 / float16 / bfloat16 (float64: "torch" only).
        k: (B, H, Nk, Dqk) keys, same dtype and device.
        v: (B, H, Nk, Dv) values; Dv may differ from Dqk.
        key_padding_mask: bool (B, Nk), True marks a padding key that is ignored. A
            query whose keys are all padding gets 0 (+ residual) and zero gradients.
        residual: (B, H, Nq, Dv), added to the output in the kernels' epilogue.
        scale: multiplies q k^T; default 1 / sqrt(Dqk).
        dropout_p: attention-probability dropout (pass 0 in evaluation). The fused
            kernels have none: a call with dropout_p > 0 runs on "torch" (SDPA).
        causal: query i sees key j only if j <= i + Nk - Nq: aligned at the bottom
            right, as when the queries are the last Nq positions of a sequence of Nk
            (Perceiver AR's latents). Combines with key_padding_mask. Rows that see no
            key (the first Nq - Nk when Nq > Nk) get 0 (+ residual).
        backend: "auto" (the first of triton, cuda, torch that accepts the input),
            or one of them explicitly (raises BackendRefusedError saying why if it
            cannot serve the input). explain() shows the choice.

    Any strides are accepted: a (B, L, H, D) tensor viewed with .transpose(1, 2)
    works without a copy. Returns (B, H, Nq, Dv) in the dtype of q; the fused kernels
    lay it out as (B, Nq, H, Dv), so merging the heads is free, while "torch" returns
    SDPA's layout.
    """
    call = validate(q, k, v, key_padding_mask, residual, scale, dropout_p, causal)
    return dispatch.select(call.problem, backend).run(call)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> dispatch.Explanation:
    """Which backend cross_attention(q, k, v, **options) would run, how, and why not the others.

    Takes the arguments of cross_attention (the same checks apply); computes nothing.
    print() the result.
    """
    arguments = _SIGNATURE.bind(q, k, v, **options)  # a misspelt option raises as in a call
    arguments.apply_defaults()
    backend = arguments.arguments.pop("backend")
    return dispatch.explain_problem(validate(**arguments.arguments).problem, backend)


_SIGNATURE = inspect.signature(cross_attention)
explain.__signature__ = _SIGNATURE.replace(return_annotation=dispatch.Explanation)
