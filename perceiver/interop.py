"""HuggingFace interop: convert a `transformers` Perceiver model into this package's layer.

    model = transformers.PerceiverForMaskedLM.from_pretrained(...)
    ours = perceiver.from_hf(model)          # same logits, fused attention

Every weight is copied (nothing is shared with the HF model). transformers is only
needed by the caller, who already has an HF model; this module does not import it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import adapters
from .layers import PerceiverLayer
from .model import PerceiverDecoder, PerceiverEncoder, PerceiverIO, PerceiverProcessor
from .position import FourierPositionEncoding, MultimodalQueries, QueryProvider, TrainablePositionEncoding

# HF PerceiverLayer parameter names -> ours.
_LAYER_NAMES = {
    "attention.self.layernorm1.": "attention.query_norm.",
    "attention.self.layernorm2.": "attention.kv_norm.",
    "attention.self.query.": "attention.query.",
    "attention.self.key.": "attention.key.",
    "attention.self.value.": "attention.value.",
    "attention.output.dense.": "attention.output.",
    "layernorm.": "layernorm.",
    "mlp.dense1.": "mlp.dense1.",
    "mlp.dense2.": "mlp.dense2.",
}


def _rename(state: dict, names: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected parameter {key!r} in the HF layer")
        renamed[names[prefix] + key[len(prefix):]] = value
    return renamed


def _layer_kwargs(hf_layer: nn.Module) -> dict:
    """Hyper-parameters of an HF PerceiverLayer, read from its modules and weights."""
    attention = hf_layer.attention.self
    return dict(
        qk_channels=attention.query.out_features,
        v_channels=attention.value.out_features,
        num_heads=attention.num_heads,
        widening_factor=hf_layer.mlp.dense1.out_features // hf_layer.mlp.dense1.in_features,
        use_query_residual=hf_layer.attention.use_query_residual,
    )


def _check_activation(config) -> None:
    if config.hidden_act != "gelu":
        raise NotImplementedError(f"only hidden_act='gelu' converts exactly (the MLP uses exact GELU), "
                                  f"got {config.hidden_act!r}")


def _load_layer(ours: PerceiverLayer, hf_layer: nn.Module) -> PerceiverLayer:
    ours.load_state_dict(_rename(hf_layer.state_dict(), _LAYER_NAMES))
    return ours


def encoder_from_hf(hf_perceiver: nn.Module) -> tuple[PerceiverEncoder, PerceiverProcessor]:
    """The latents, the cross-attention layer and the shared self-attention block of a PerceiverModel."""
    _check_activation(hf_perceiver.config)
    cross = hf_perceiver.encoder.cross_attention
    latents = hf_perceiver.embeddings.latents
    encoder = PerceiverEncoder(
        input_dim=cross.attention.self.key.in_features, num_latents=latents.shape[0], latent_dim=latents.shape[1],
        **_layer_kwargs(cross),
    )
    encoder.latents.data.copy_(latents.data)
    _load_layer(encoder.cross_attention, cross)
    blocks = hf_perceiver.encoder.self_attends
    block_kwargs = _layer_kwargs(blocks[0])
    if not block_kwargs.pop("use_query_residual"):
        raise NotImplementedError("self-attention layers without a query residual are not converted")
    processor = PerceiverProcessor(latents.shape[1], num_layers_per_block=len(blocks),
                                   num_blocks=hf_perceiver.config.num_blocks, **block_kwargs)
    for ours, theirs in zip(processor.layers, blocks):
        _load_layer(ours, theirs)
    return encoder, processor


def _decoder_from_basic(basic: nn.Module, latent_dim: int) -> PerceiverDecoder:
    """Our decoder from an HF PerceiverBasicDecoder's cross-attention layer and final layer."""
    layer = basic.decoding_cross_attention
    final = basic.final_layer
    decoder = PerceiverDecoder(
        query_dim=layer.attention.self.query.in_features, latent_dim=latent_dim,
        output_dim=final.out_features if isinstance(final, nn.Linear) else None, **_layer_kwargs(layer),
    )
    _load_layer(decoder.cross_attention, layer)
    if isinstance(final, nn.Linear):
        decoder.final_layer.load_state_dict(final.state_dict())
    return decoder


def _queries_from_basic(basic: nn.Module, endpoint: bool = True) -> QueryProvider:
    """The query provider equal to an HF PerceiverBasicDecoder's decoder_query.

    endpoint=False gives the Fourier grid HF uses when it subsamples (see linear_positions).
    """
    if not isinstance(basic.positions_projection, nn.Identity):
        raise NotImplementedError("decoders with project_pos_dim are not converted yet")
    encoding = basic.output_position_encodings
    if basic.position_encoding_type == "trainable":
        table = encoding.position_embeddings
        provider = TrainablePositionEncoding(table.shape[0], table.shape[1])
        provider.position_embeddings.data.copy_(table.data)
        return provider
    if basic.position_encoding_type == "fourier":
        index_dims = basic.output_index_dims
        return FourierPositionEncoding((index_dims,) if isinstance(index_dims, int) else index_dims,
                                       encoding.num_bands, encoding.max_resolution, encoding.concat_pos,
                                       encoding.sine_only, endpoint)
    raise NotImplementedError(f"decoder position encoding {basic.position_encoding_type!r} is not converted")


def _multimodal_queries(hf_decoder: nn.Module) -> MultimodalQueries:
    """The queries of an HF PerceiverMultimodalDecoder, on the grid of its subsampled decoding.

    HF builds correct multimodal queries only for subsampled outputs (its full path
    takes the grid from the wrong axis), with positions -1 + 2 i / n: the converted
    queries use that grid for every index, so full and subsampled decodes agree.
    """
    providers = {}
    for name in sorted(hf_decoder.modalities):
        modality = hf_decoder.modalities[name]
        basic = modality if type(modality).__name__ == "PerceiverBasicDecoder" else modality.decoder
        providers[name] = _queries_from_basic(basic, endpoint=False)
    queries = MultimodalQueries(providers, min_padding_size=hf_decoder.min_padding_size)
    queries.padding.load_state_dict(hf_decoder.padding.state_dict())
    return queries


class FirstQuery(nn.Module):
    """(B, 1, C) -> (B, C): the single query of a classification decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def from_hf(model: nn.Module) -> PerceiverIO:
    """Converts a transformers Perceiver model; the result returns the HF model's `.logits`.

    Supported: PerceiverForMaskedLM, PerceiverForImageClassificationLearned,
    PerceiverForImageClassificationFourier, PerceiverForImageClassificationConvProcessing,
    PerceiverForOpticalFlow, PerceiverForMultimodalAutoencoding. Call the result with
    the HF model's `inputs`; an HF `attention_mask` (1 = keep) becomes
    `key_padding_mask=attention_mask == 0`. For the multimodal autoencoder, HF's
    `subsampled_output_points` become `index, sizes = model.queries.index_of(points)`,
    then `model(inputs, index=index)` with the output adapter given those sizes
    (see multimodal_decode).
    """
    kind = type(model).__name__
    hf = model.perceiver
    encoder, processor = encoder_from_hf(hf)
    latent_dim = encoder.latents.shape[1]
    hf_decoder = hf.decoder
    if kind == "PerceiverForMaskedLM":
        token_adapter = adapters.TokenInputAdapter.from_hf(hf.input_preprocessor)
        return PerceiverIO(
            encoder, processor, _decoder_from_basic(hf_decoder, latent_dim), _queries_from_basic(hf_decoder),
            input_adapter=token_adapter,
            output_adapter=adapters.EmbeddingDecoderOutputAdapter.from_hf(model.embedding_decoder, token_adapter.embeddings),
        )
    if kind.startswith("PerceiverForImageClassification"):
        basic = hf_decoder.decoder
        return PerceiverIO(
            encoder, processor, _decoder_from_basic(basic, latent_dim), _queries_from_basic(basic),
            input_adapter=adapters.ImageInputAdapter.from_hf(hf.input_preprocessor), output_adapter=FirstQuery(),
        )
    if kind == "PerceiverForOpticalFlow":
        return PerceiverIO(
            encoder, processor, _decoder_from_basic(hf_decoder.decoder, latent_dim), queries=None,
            input_adapter=adapters.ImageInputAdapter.from_hf(hf.input_preprocessor),
            output_adapter=adapters.FlowOutputAdapter.from_hf(hf_decoder),
        )
    if kind == "PerceiverForMultimodalAutoencoding":
        queries = _multimodal_queries(hf_decoder)
        return PerceiverIO(
            encoder, processor, _decoder_from_basic(hf_decoder.decoder, latent_dim), queries,
            input_adapter=adapters.MultimodalInputAdapter.from_hf(hf.input_preprocessor),
            output_adapter=adapters.MultimodalOutputAdapter.from_hf(hf.output_postprocessor, queries.sizes),
        )
    raise NotImplementedError(f"converting {kind} is not supported yet")


def multimodal_decode(model: PerceiverIO, inputs: dict, points: dict[str, Optional[torch.Tensor]],
                      chunk_size: Optional[int] = None) -> dict:
    """Per-modality outputs at the given points (None: every point of that modality).

    The equivalent of an HF multimodal model called with subsampled_output_points.
    """
    index, sizes = model.queries.index_of(points)
    latents = model.encode(inputs)
    outputs = model.decoder(latents, model.queries, index=index.to(latents.device), chunk_size=chunk_size)
    return model.output_adapter(outputs, sizes)


def hf_key_padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """HF attention_mask (1 = keep) -> our key_padding_mask (True = padding)."""
    return None if attention_mask is None else attention_mask == 0
