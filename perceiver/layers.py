"""Perceiver IO layers: attention followed by an MLP, each with its residual (the paper's block)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import MultiHeadAttention
from .checks import check_dropout


class MLP(nn.Module):
    """Linear(dim, widening_factor * dim) -> GELU -> Linear(widening_factor * dim, dim)."""

    def __init__(self, dim: int, widening_factor: int = 4, dropout: float = 0.0):
        super().__init__()
        self.dense1 = nn.Linear(dim, widening_factor * dim)
        self.activation = nn.GELU()
        self.dense2 = nn.Linear(widening_factor * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense2(self.activation(self.dense1(x))))


class PerceiverLayer(nn.Module):
    """x = attention(queries[, inputs]) (+ queries); out = x + MLP(LayerNorm(x)).

    Cross-attention layers (encoder, decoder) take inputs of width kv_dim; self-attention
    layers (processor) attend the queries to themselves. Arguments as in
    MultiHeadAttention; `dropout` applies to the MLP output, `attention_dropout` to the
    attention probabilities. key_padding_mask: bool (B, Nk), True = padding.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: Optional[int] = None,
        *,
        cross_attention: bool = True,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        num_heads: int = 1,
        widening_factor: int = 4,
        use_query_residual: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        # Checked here too, so that the error names this layer's argument.
        check_dropout("attention_dropout", attention_dropout)
        self.attention = MultiHeadAttention(
            q_dim, kv_dim, qk_channels=qk_channels, v_channels=v_channels, num_heads=num_heads,
            use_query_residual=use_query_residual, cross_attention=cross_attention,
            dropout=attention_dropout, backend=backend,
        )
        self.layernorm = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening_factor, dropout)

    def _mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))

    def forward(
        self,
        queries: torch.Tensor,
        inputs: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self._mlp_block(self.attention(queries, inputs, key_padding_mask))

    def forward_projected(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The layer on keys and values already projected by `self.attention.project_kv`."""
        return self._mlp_block(self.attention.attend(queries, keys, values, key_padding_mask))


def self_attention_layer(dim: int, **kwargs) -> PerceiverLayer:
    """A PerceiverLayer that attends `dim`-wide tokens to themselves (the processor's layer)."""
    return PerceiverLayer(dim, dim, cross_attention=False, **kwargs)
