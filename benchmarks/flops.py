"""Analytic FLOP counts (multiply-add = 2 FLOPs), checked against FlopCounterMode in the tests.

Attention: forward 2 B H Nq Nk (Dqk + Dv) (= 4 B H Nq Nk d); backward 2.5x that, the
convention of fused kernels, which recompute Q K^T (0.5x) besides the 2x of dQ, dK,
dV and dP. Dense layers: 2 * tokens * in * out. Norms, softmax and activations are
not counted.
"""

from __future__ import annotations

BACKWARD_FACTOR = 2.5


def attention(batch: int, heads: int, num_queries: int, num_keys: int, head_dim_qk: int,
              head_dim_v: int | None = None) -> int:
    head_dim_v = head_dim_qk if head_dim_v is None else head_dim_v
    return 2 * batch * heads * num_queries * num_keys * (head_dim_qk + head_dim_v)


def linear(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def perceiver_layer(batch: int, num_queries: int, num_keys: int, q_dim: int, kv_dim: int, qk_channels: int,
                    v_channels: int, num_heads: int, widening_factor: int) -> int:
    """One PerceiverLayer: q/k/v/output projections, attention, MLP."""
    queries, keys = batch * num_queries, batch * num_keys
    return (linear(queries, q_dim, qk_channels) + linear(keys, kv_dim, qk_channels) + linear(keys, kv_dim, v_channels)
            + attention(batch, num_heads, num_queries, num_keys, qk_channels // num_heads, v_channels // num_heads)
            + linear(queries, v_channels, q_dim)
            + 2 * linear(queries, q_dim, widening_factor * q_dim))


def transformer_encoder_layer(batch: int, length: int, dim: int, num_heads: int, feedforward: int) -> int:
    """One nn.TransformerEncoderLayer: in/out projections, self-attention over all tokens, FFN."""
    tokens = batch * length
    return (linear(tokens, dim, 3 * dim) + attention(batch, num_heads, length, length, dim // num_heads)
            + linear(tokens, dim, dim) + linear(tokens, dim, feedforward) + linear(tokens, feedforward, dim))
