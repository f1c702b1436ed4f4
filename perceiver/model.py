"""Perceiver IO: encoder (inputs -> latents), processor (latents -> latents), decoder (queries -> outputs)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .checks import check_dtype, check_positive_int
from .layers import PerceiverLayer, self_attention_layer
from .position import QueryProvider, TensorQueries, check_index


class PerceiverEncoder(nn.Module):
    """Learned latents (num_latents, latent_dim) cross-attend to (B, M, input_dim) inputs.

    The cross-attention layer has the paper's defaults: one head, qk/v channels =
    latent_dim, query residual, MLP widening factor 1.
    """

    def __init__(
        self,
        input_dim: int,
        num_latents: int,
        latent_dim: int,
        *,
        num_heads: int = 1,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        widening_factor: int = 1,
        use_query_residual: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        init_scale: float = 0.02,
        backend: str = "auto",
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * init_scale)
        self.cross_attention = PerceiverLayer(
            latent_dim, input_dim, qk_channels=qk_channels, v_channels=v_channels, num_heads=num_heads,
            widening_factor=widening_factor, use_query_residual=use_query_residual, dropout=dropout,
            attention_dropout=attention_dropout, backend=backend,
        )

    def forward(self, inputs: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs (B, M, input_dim), key_padding_mask bool (B, M) True = padding -> (B, N, latent_dim)."""
        input_dim = self.cross_attention.attention.kv_norm.normalized_shape[0]
        if inputs.dim() != 3 or inputs.shape[-1] != input_dim:
            raise ValueError(f"inputs must be (B, M, input_dim={input_dim}), got shape {tuple(inputs.shape)}")
        latents = self.latents.expand(inputs.shape[0], -1, -1)
        return self.cross_attention(latents, inputs, key_padding_mask)


class PerceiverProcessor(nn.Module):
    """num_blocks repetitions of the same num_layers_per_block self-attention layers (shared weights)."""

    def __init__(
        self,
        latent_dim: int,
        *,
        num_layers_per_block: int = 6,
        num_blocks: int = 1,
        num_heads: int = 8,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        widening_factor: int = 4,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.num_blocks = num_blocks
        self.layers = nn.ModuleList(
            self_attention_layer(latent_dim, qk_channels=qk_channels, v_channels=v_channels, num_heads=num_heads,
                                 widening_factor=widening_factor, dropout=dropout,
                                 attention_dropout=attention_dropout, backend=backend)
            for _ in range(num_layers_per_block)
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_blocks):
            for layer in self.layers:
                latents = layer(latents)
        return latents


class PerceiverDecoder(nn.Module):
    """Output queries (B, O, query_dim) cross-attend to latents; optional final projection.

    Defaults as in the paper's decoders: one head, no query residual, widening factor 1,
    a final Linear(query_dim, output_dim) when output_dim is given.

    forward(latents, queries, index=None, chunk_size=None):
    - queries: a tensor (B, O, C) / (O, C) or a QueryProvider that builds queries for
      any index subset on demand (Fourier or learned positions, per-modality queries);
    - index: decode only these output indices (a 1-D int64 or int32 tensor of
      positions in [0, O), checked once per call as QueryProvider describes); equal
      to the same rows of a full decode (the paper's subsampled training);
    - chunk_size: project the latents' keys and values once, then run the queries
      through the whole layer chunk_size at a time, so that activations never
      exceed one chunk: peak memory does not grow with O beyond the output itself.
      (Under autograd every chunk's activations are kept; train on subsets instead.)
    """

    def __init__(
        self,
        query_dim: int,
        latent_dim: int,
        output_dim: Optional[int] = None,
        *,
        num_heads: int = 1,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        widening_factor: int = 1,
        use_query_residual: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__()
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.cross_attention = PerceiverLayer(
            query_dim, latent_dim, qk_channels=qk_channels, v_channels=v_channels, num_heads=num_heads,
            widening_factor=widening_factor, use_query_residual=use_query_residual, dropout=dropout,
            attention_dropout=attention_dropout, backend=backend,
        )
        self.final_layer = nn.Linear(query_dim, output_dim) if output_dim is not None else nn.Identity()
        self.output_dim = output_dim if output_dim is not None else query_dim
        self.chunk_size = chunk_size

    def forward(
        self,
        latents: torch.Tensor,
        queries: Union[torch.Tensor, QueryProvider],
        index: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        provider = queries if isinstance(queries, QueryProvider) else TensorQueries(queries)
        query_dim = self.cross_attention.attention.query_norm.normalized_shape[0]
        latent_dim = self.cross_attention.attention.kv_norm.normalized_shape[0]
        if provider.num_channels != query_dim:
            raise ValueError(f"queries must have query_dim={query_dim} channels, got {provider.num_channels}")
        if latents.dim() != 3 or latents.shape[-1] != latent_dim:
            raise ValueError(f"latents must be (B, N, latent_dim={latent_dim}), got shape {tuple(latents.shape)}")
        check_dtype("latents", latents, self.cross_attention.attention.key.weight)
        chunk_size = chunk_size if chunk_size is not None else self.chunk_size
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        if index is not None:
            # Checked once here; the chunks below are slices of it, built without a re-check.
            index = check_index(index, provider.num_queries).to(latents.device)
        batch = latents.shape[0]
        total = provider.num_queries if index is None else index.shape[0]
        keys, values = self.cross_attention.attention.project_kv(latents)

        def decode(rows: Optional[torch.Tensor]) -> torch.Tensor:
            chunk_queries = provider.build(batch, rows, device=latents.device, dtype=latents.dtype)
            return self.final_layer(self.cross_attention.forward_projected(chunk_queries, keys, values))

        if chunk_size is None or chunk_size >= total:
            return decode(index)
        out = None
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            rows = torch.arange(start, stop, device=latents.device) if index is None else index[start:stop]
            chunk = decode(rows)
            if out is None:
                out = chunk.new_empty(batch, total, chunk.shape[-1])
            out[:, start:stop] = chunk
        return out


class PerceiverIO(nn.Module):
    """input adapter -> encoder -> processor -> decoder -> output adapter.

    The input adapter maps raw inputs to (B, M, input_dim), or to a tuple
    (inputs, key_padding_mask); the output adapter maps decoder outputs to the task's
    outputs. Every key_padding_mask here, passed or from the adapter, is bool (B, M)
    with True = padding (a key to ignore): the opposite of CrossAttention's `mask`
    (True = keep, perceiver-pytorch's convention). `queries` is the decoder's
    QueryProvider (or a tensor); None makes the adapted inputs the queries (one output
    per input, as in optical flow).
    encode() and decode() can be used on their own, e.g. to decode a subset or in chunks.
    """

    def __init__(
        self,
        encoder: PerceiverEncoder,
        processor: PerceiverProcessor,
        decoder: PerceiverDecoder,
        queries: Union[torch.Tensor, QueryProvider, None],
        input_adapter: Optional[nn.Module] = None,
        output_adapter: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.input_adapter = input_adapter if input_adapter is not None else nn.Identity()
        self.encoder = encoder
        self.processor = processor
        self.decoder = decoder
        self.queries = queries if queries is None or isinstance(queries, QueryProvider) else TensorQueries(queries)
        self.output_adapter = output_adapter if output_adapter is not None else nn.Identity()

    def adapt(self, inputs, key_padding_mask: Optional[torch.Tensor] = None):
        """Raw inputs -> (B, M, input_dim) and the combined key padding mask (True = padding)."""
        adapted = self.input_adapter(inputs)
        if isinstance(adapted, tuple):
            adapted, adapter_mask = adapted
            if adapter_mask is not None:
                key_padding_mask = adapter_mask if key_padding_mask is None else key_padding_mask | adapter_mask
        return adapted, key_padding_mask

    def encode(self, inputs, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.processor(self.encoder(*self.adapt(inputs, key_padding_mask)))

    def decode(self, latents: torch.Tensor, index: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
               queries: Union[torch.Tensor, QueryProvider, None] = None) -> torch.Tensor:
        queries = self.queries if queries is None else queries
        if queries is None:
            raise ValueError("this model takes its queries from its inputs: pass queries= (the adapted inputs)")
        return self.output_adapter(self.decoder(latents, queries, index=index, chunk_size=chunk_size))

    def forward(self, inputs, key_padding_mask: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        adapted, key_padding_mask = self.adapt(inputs, key_padding_mask)
        latents = self.processor(self.encoder(adapted, key_padding_mask))
        queries = adapted if self.queries is None else self.queries
        return self.decode(latents, index=index, chunk_size=chunk_size, queries=queries)
