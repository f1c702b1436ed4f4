"""Attention modules on top of perceiver_kernels.cross_attention.

- CrossAttention: a drop-in replacement for perceiver-pytorch's `Attention`.
- MultiHeadAttention: the Perceiver IO attention of the paper (HF / DeepMind):
  LayerNorm on queries and on keys/values, q/k/v projections with biases,
  qk_channels != v_channels, output projection and an optional query residual.

Both call the fused op through its public API only; with attention-probability
dropout in training the op runs on its "torch" backend (SDPA), the one with dropout.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import perceiver_kernels as pk

from .checks import (check_backend, check_channels, check_dims, check_dropout, check_dtype, check_key_mask,
                     check_positive_int, check_same_batch)
from .padding import head_projection, merge_projection, stored_head_dims, true_scale

# The two mask conventions of this package, named in every docstring and error that takes
# a mask: CrossAttention's `mask` keeps perceiver-pytorch's (lucidrains'), everything
# else takes the op's key_padding_mask.
KEEP = "True = keep (perceiver-pytorch's convention)"
PADDING = "True = padding (a key to ignore)"


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D) as a view: the op takes any strides."""
    batch, length, channels = x.shape
    return x.view(batch, length, heads, channels // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D); free for the op's output, laid out as (B, L, H, D)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class CrossAttention(nn.Module):
    """Drop-in replacement for `perceiver_pytorch.perceiver_io.Attention`.

    Same constructor, parameter names and shapes (`to_q`, `to_kv` holding K then V,
    `to_out`), same `forward(x, context=None, mask=None)` with mask bool (B, Nk),
    True = keep; state dicts load in both directions. Differences: a query whose keys
    are all masked gets to_out(0) (its bias) instead of an average of every value.

    Extras, all off by default: `value_dim_head` (Dv != Dqk), `qkv_bias`,
    `key_padding_mask` (True = padding: the convention of the op, MultiHeadAttention
    and PerceiverIO, opposite to `mask`), `backend`.
    `dropout` drops attention probabilities in training (through PyTorch SDPA).
    `scale` multiplies q k^T (default dim_head ** -0.5, as perceiver-pytorch) and may
    be changed after construction, as there.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        *,
        value_dim_head: Optional[int] = None,
        qkv_bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        context_dim = query_dim if context_dim is None else context_dim
        value_dim_head = dim_head if value_dim_head is None else value_dim_head
        for name, value in (("query_dim", query_dim), ("context_dim", context_dim), ("heads", heads),
                            ("dim_head", dim_head), ("value_dim_head", value_dim_head)):
            check_positive_int(name, value)
        check_dropout("dropout", dropout)
        check_backend(backend)
        self.heads = heads
        self.dim_head = dim_head
        self.value_dim_head = value_dim_head
        self.scale = dim_head**-0.5
        self.dropout = dropout
        self.backend = backend
        # Wide heads are stored padded (perceiver/padding.py); state dicts keep the true shapes.
        stored_qk, stored_v = stored_head_dims(dim_head, value_dim_head)
        self.stored_head_dims = (stored_qk, stored_v)
        self.to_q = head_projection(query_dim, ((heads, dim_head, stored_qk),), bias=qkv_bias)
        self.to_kv = head_projection(context_dim, ((heads, dim_head, stored_qk), (heads, value_dim_head, stored_v)),
                                     bias=qkv_bias)
        self.to_out = merge_projection(((heads, value_dim_head, stored_v),), query_dim)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        check_dims("x", x, (3,), "(B, Nq, query_dim)")
        check_channels("x", x, self.to_q.in_features)
        check_dtype("x", x, self.to_q.weight)
        if context is None:
            context = x
        else:
            check_dims("context", context, (3,), "(B, Nk, context_dim)")
            check_same_batch("x", x, "context", context)
            check_dtype("context", context, self.to_kv.weight)
        check_channels("context", context, self.to_kv.in_features)
        if mask is not None and key_padding_mask is not None:
            raise ValueError("pass either mask (True = keep) or key_padding_mask (True = padding), not both")
        batch, num_keys = context.shape[:2]
        if mask is not None:
            # perceiver-pytorch flattens every dim after the batch ('b ... -> b (...)'): so does its drop-in.
            if isinstance(mask, torch.Tensor) and mask.dim() > 2:
                mask = mask.flatten(1)
            check_key_mask("mask", mask, batch, num_keys, KEEP)
            key_padding_mask = ~mask
        elif key_padding_mask is not None:
            check_key_mask("key_padding_mask", key_padding_mask, batch, num_keys, PADDING)
        q = split_heads(self.to_q(x), self.heads)
        k, v = self.to_kv(context).split([self.heads * dim for dim in self.stored_head_dims], dim=-1)
        out = pk.cross_attention(q, split_heads(k, self.heads), split_heads(v, self.heads),
                                 key_padding_mask=key_padding_mask, scale=self.scale,
                                 dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.to_out(merge_heads(out))


class MultiHeadAttention(nn.Module):
    """Perceiver IO attention: LN(q), LN(kv), projections, fused attention, output, residual.

    qk_channels / v_channels are totals over heads (defaults: q_dim). The output
    projection maps v_channels to output_channels (default q_dim); with
    use_query_residual the un-normalised queries are added inside that projection's
    GEMM (torch.addmm), not in an extra pass. Self-attention (cross_attention=False)
    takes keys and values from the normalised queries.

    project_kv() and attend() split the work so that a decoder can project the
    latents' keys and values once and attend many query chunks to them.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: Optional[int] = None,
        *,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        num_heads: int = 1,
        output_channels: Optional[int] = None,
        use_query_residual: bool = True,
        cross_attention: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        kv_dim = q_dim if kv_dim is None else kv_dim
        qk_channels = q_dim if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        output_channels = q_dim if output_channels is None else output_channels
        for name, value in (("q_dim", q_dim), ("kv_dim", kv_dim), ("qk_channels", qk_channels),
                            ("v_channels", v_channels), ("num_heads", num_heads), ("output_channels", output_channels)):
            check_positive_int(name, value)
        check_dropout("dropout", dropout)
        check_backend(backend)
        for name, channels in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if channels % num_heads:
                raise ValueError(f"{name} ({channels}) must be divisible by num_heads ({num_heads})")
        if use_query_residual and output_channels != q_dim:
            raise ValueError(f"use_query_residual needs output_channels == q_dim ({q_dim}), got {output_channels}")
        if not cross_attention and kv_dim != q_dim:
            raise ValueError(f"self-attention takes keys from the queries: kv_dim must equal q_dim ({q_dim})")
        self.num_heads = num_heads
        self.cross_attention = cross_attention
        self.use_query_residual = use_query_residual
        self.dropout = dropout
        self.backend = backend
        self.query_norm = nn.LayerNorm(q_dim)
        self.kv_norm = nn.LayerNorm(kv_dim) if cross_attention else nn.Identity()
        # Wide heads are stored padded (perceiver/padding.py); state dicts keep the true
        # shapes, and the softmax scale is the true head dim's.
        head_dim_qk, head_dim_v = qk_channels // num_heads, v_channels // num_heads
        stored_qk, stored_v = stored_head_dims(head_dim_qk, head_dim_v)
        self.scale = true_scale(head_dim_qk)
        self.query = head_projection(q_dim, ((num_heads, head_dim_qk, stored_qk),))
        self.key = head_projection(kv_dim, ((num_heads, head_dim_qk, stored_qk),))
        self.value = head_projection(kv_dim, ((num_heads, head_dim_v, stored_v),))
        self.output = merge_projection(((num_heads, head_dim_v, stored_v),), output_channels)

    def project_kv(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nk, kv_dim) -> keys (B, H, Nk, Dqk) and values (B, H, Nk, Dv), in the stored
        head dims (a wide head padded to a multiple of 16: perceiver/padding.py)."""
        normed = self.kv_norm(inputs)
        return split_heads(self.key(normed), self.num_heads), split_heads(self.value(normed), self.num_heads)

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        normed_queries: Optional[torch.Tensor] = None,
        *,
        causal: bool = False,
        transform_queries: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Attention of (B, Nq, q_dim) queries to projected keys and values.

        causal: the op's bottom-right causal mask (the queries are the last Nq of the
        Nk positions). transform_queries maps the projected queries (B, H, Nq, Dqk)
        before the attention: a position encoding applied to q and k after their
        projections (rotary), whose keys the caller passes already transformed.
        """
        normed = self.query_norm(queries) if normed_queries is None else normed_queries
        q = split_heads(self.query(normed), self.num_heads)
        if transform_queries is not None:
            q = transform_queries(q)
        context = merge_heads(pk.cross_attention(q, keys, values, key_padding_mask=key_padding_mask, scale=self.scale,
                                                 dropout_p=self.dropout if self.training else 0.0,
                                                 causal=causal, backend=self.backend))
        if not self.use_query_residual:
            return self.output(context)
        # The residual enters as the GEMM's C operand; the bias is added in place.
        flat = context.reshape(-1, context.shape[-1])
        out = torch.addmm(queries.reshape(-1, queries.shape[-1]), flat, self.output.weight.t())
        # The width is spelled out: view(..., -1) cannot infer it for an empty batch.
        return out.add_(self.output.bias).view(*context.shape[:-1], self.output.out_features)

    def forward(
        self,
        queries: torch.Tensor,
        inputs: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Cross-attention of queries (B, Nq, q_dim) to inputs (B, Nk, kv_dim), or self-attention.

        key_padding_mask: bool (B, Nk), True = padding (the opposite of CrossAttention's
        `mask`, True = keep).
        """
        check_dims("queries", queries, (3,), "(B, Nq, q_dim)")
        check_channels("queries", queries, self.query.in_features)
        check_dtype("queries", queries, self.query.weight)
        if self.cross_attention:
            if inputs is None:
                raise ValueError("cross-attention needs inputs (B, Nk, kv_dim)")
            check_dims("inputs", inputs, (3,), "(B, Nk, kv_dim)")
            check_channels("inputs", inputs, self.key.in_features)
            check_same_batch("queries", queries, "inputs", inputs)
            check_dtype("inputs", inputs, self.key.weight)
        elif inputs is not None:
            raise ValueError("self-attention takes no inputs: keys and values come from the queries")
        if key_padding_mask is not None:
            keys_from = inputs if self.cross_attention else queries
            check_key_mask("key_padding_mask", key_padding_mask, *keys_from.shape[:2], PADDING)
        if self.cross_attention:
            keys, values = self.project_kv(inputs)
            return self.attend(queries, keys, values, key_padding_mask)
        normed = self.query_norm(queries)
        keys, values = self.project_kv(normed)
        return self.attend(queries, keys, values, key_padding_mask, normed_queries=normed)


def use_backend(model: nn.Module, backend: str) -> nn.Module:
    """Makes every attention of `model` run on `backend` (a perceiver_kernels backend
    name); returns the model. E.g. a model from `from_hf` on the CUDA C++ kernels:
    `use_backend(perceiver.from_hf(hf_model).cuda(), "cuda")`."""
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, (CrossAttention, MultiHeadAttention)):
            module.backend = backend
    return model
