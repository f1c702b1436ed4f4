"""HuggingFace interop: convert a `transformers` Perceiver model into this package's layer.

    model = transformers.PerceiverForMaskedLM.from_pretrained(...)
    ours = perceiver.from_hf(model)          # same logits, fused attention

Every weight is copied (nothing is shared with the HF model). transformers is only
needed by the caller, who already has an HF model; this module does not import it.
"""

from __future__ import annotations

import functools
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


# HF hidden_act names (transformers.activations.ACT2FN) -> the torch module computing the same.
_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_python": nn.GELU,
    "gelu_new": functools.partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "gelu_python_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "linear": nn.Identity,
}


def _activation(config) -> nn.Module:
    factory = _ACTIVATIONS.get(config.hidden_act) if isinstance(config.hidden_act, str) else None
    if factory is None:
        raise NotImplementedError(f"hidden_act={config.hidden_act!r} is not converted; supported: "
                                  f"{sorted(_ACTIVATIONS)}")
    return factory()


def _load_layer(ours: PerceiverLayer, hf_layer: nn.Module, config) -> PerceiverLayer:
    ours.mlp.activation = _activation(config)
    ours.load_state_dict(_rename(hf_layer.state_dict(), _LAYER_NAMES))
    return ours


def encoder_from_hf(hf_perceiver: nn.Module) -> tuple[PerceiverEncoder, PerceiverProcessor]:
    """The latents, the cross-attention layer and the shared self-attention block of a PerceiverModel."""
    config = hf_perceiver.config
    cross = hf_perceiver.encoder.cross_attention
    latents = hf_perceiver.embeddings.latents
    encoder = PerceiverEncoder(
        input_dim=cross.attention.self.key.in_features, num_latents=latents.shape[0], latent_dim=latents.shape[1],
        **_layer_kwargs(cross),
    )
    encoder.latents.data.copy_(latents.data)
    _load_layer(encoder.cross_attention, cross, config)
    blocks = hf_perceiver.encoder.self_attends
    if len(blocks) == 0:  # num_self_attends_per_block=0: the latents go straight to the decoder
        return encoder, PerceiverProcessor(latents.shape[1], num_layers_per_block=0)
    _check_self_attention_width(blocks[0], config)
    block_kwargs = _layer_kwargs(blocks[0])
    if not block_kwargs.pop("use_query_residual"):
        raise NotImplementedError("self-attention layers without a query residual are not converted")
    processor = PerceiverProcessor(latents.shape[1], num_layers_per_block=len(blocks),
                                   num_blocks=config.num_blocks, **block_kwargs)
    for ours, theirs in zip(processor.layers, blocks):
        _load_layer(ours, theirs, config)
    return encoder, processor


def _check_self_attention_width(hf_layer: nn.Module, config) -> None:
    """Refuses the configurations whose self-attention HF builds but cannot run.

    HF's self-attention output projection keeps v_channels (v_channels, else
    qk_channels, else d_latents) channels, then adds the d_latents-wide latents to it:
    unless the two agree, the HF model fails at its first forward, and its weights
    fit no layer that can run.
    """
    v_channels = hf_layer.attention.output.dense.out_features
    d_latents = hf_layer.layernorm.normalized_shape[0]
    if v_channels != d_latents:
        raise ValueError(
            f"this HF model cannot run, so it is not converted: its self-attention layers have v_channels="
            f"{v_channels} (config.v_channels={config.v_channels}, config.qk_channels={config.qk_channels}) "
            f"but HF adds them to the d_latents={d_latents}-wide latents. HF runs with v_channels = d_latents, "
            f"or with v_channels unset and qk_channels unset or = d_latents")


def _decoder_from_basic(basic: nn.Module, config) -> PerceiverDecoder:
    """Our decoder from an HF PerceiverBasicDecoder's cross-attention layer and final layer."""
    layer = basic.decoding_cross_attention
    final = basic.final_layer
    decoder = PerceiverDecoder(
        query_dim=layer.attention.self.query.in_features, latent_dim=layer.attention.self.key.in_features,
        output_dim=final.out_features if isinstance(final, nn.Linear) else None, **_layer_kwargs(layer),
    )
    _load_layer(decoder.cross_attention, layer, config)
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


def _masked_lm(model: nn.Module, encoder: PerceiverEncoder, processor: PerceiverProcessor) -> PerceiverIO:
    hf = model.perceiver
    token_adapter = adapters.TokenInputAdapter.from_hf(hf.input_preprocessor)
    decoder = _decoder_from_basic(hf.decoder, model.config)
    return PerceiverIO(
        encoder, processor, decoder, _queries_from_basic(hf.decoder), input_adapter=token_adapter,
        output_adapter=adapters.EmbeddingDecoderOutputAdapter.from_hf(model.embedding_decoder,
                                                                      token_adapter.embeddings),
    )


def _image_classification(model: nn.Module, encoder: PerceiverEncoder, processor: PerceiverProcessor) -> PerceiverIO:
    hf = model.perceiver
    basic = hf.decoder.decoder
    return PerceiverIO(
        encoder, processor, _decoder_from_basic(basic, model.config), _queries_from_basic(basic),
        input_adapter=adapters.ImageInputAdapter.from_hf(hf.input_preprocessor), output_adapter=FirstQuery(),
    )


def _optical_flow(model: nn.Module, encoder: PerceiverEncoder, processor: PerceiverProcessor) -> PerceiverIO:
    hf = model.perceiver
    return PerceiverIO(
        encoder, processor, _decoder_from_basic(hf.decoder.decoder, model.config), queries=None,
        input_adapter=adapters.ImageInputAdapter.from_hf(hf.input_preprocessor),
        output_adapter=adapters.FlowOutputAdapter.from_hf(hf.decoder),
    )


def _multimodal_autoencoding(model: nn.Module, encoder: PerceiverEncoder, processor: PerceiverProcessor
                             ) -> PerceiverIO:
    hf = model.perceiver
    queries = _multimodal_queries(hf.decoder)
    return PerceiverIO(
        encoder, processor, _decoder_from_basic(hf.decoder.decoder, model.config), queries,
        input_adapter=adapters.MultimodalInputAdapter.from_hf(hf.input_preprocessor),
        output_adapter=adapters.MultimodalOutputAdapter.from_hf(hf.output_postprocessor, queries.sizes),
    )


_CONVERTERS = {
    "PerceiverForMaskedLM": _masked_lm,
    "PerceiverForImageClassificationLearned": _image_classification,
    "PerceiverForImageClassificationFourier": _image_classification,
    "PerceiverForImageClassificationConvProcessing": _image_classification,
    "PerceiverForOpticalFlow": _optical_flow,
    "PerceiverForMultimodalAutoencoding": _multimodal_autoencoding,
}


def from_hf(model: nn.Module) -> PerceiverIO:
    """Converts a transformers Perceiver model; the result returns the HF model's `.logits`.

    Supported: PerceiverForMaskedLM, PerceiverForImageClassificationLearned,
    PerceiverForImageClassificationFourier, PerceiverForImageClassificationConvProcessing,
    PerceiverForOpticalFlow, PerceiverForMultimodalAutoencoding, in every configuration
    that HF can run, with any hidden_act that has a torch equivalent (see _ACTIVATIONS).
    Other HF Perceiver task models raise NotImplementedError; anything else (a bare
    PerceiverModel, which has no task head, any other module, None) a TypeError. A
    configuration HF builds but cannot run (self-attention v_channels other than
    d_latents) raises ValueError. The converted model has no attention dropout (HF's
    attention_probs_dropout_prob is not carried over). Call the result with
    the HF model's `inputs`; an HF `attention_mask` (1 = keep) becomes
    `key_padding_mask=attention_mask == 0`. For the multimodal autoencoder, HF's
    `subsampled_output_points` become `index, sizes = model.queries.index_of(points)`,
    then `model(inputs, index=index)` with the output adapter given those sizes
    (see multimodal_decode).
    """
    kind = type(model).__name__
    converter = _CONVERTERS.get(kind)
    if converter is None:
        supported = ", ".join(_CONVERTERS)
        if kind.startswith("PerceiverFor"):
            raise NotImplementedError(f"converting {kind} is not supported yet; from_hf converts {supported}")
        raise TypeError(f"from_hf converts a transformers Perceiver model with a task head ({supported}), got {kind}")
    return converter(model, *encoder_from_hf(model.perceiver))


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
