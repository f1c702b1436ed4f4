"""Output adapters: (B, O, C) decoder outputs to task outputs (logits, tokens, audio,
optical flow, several modalities), equal to HF's postprocessors."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import check_channels, check_dims
from ._hf import hf_type, load


class ClassificationOutputAdapter(nn.Module):
    """Decoder outputs (B, O, in_channels) -> logits (B, num_classes) of the first query.

    (HF PerceiverClassificationPostprocessor. HF's classification decoders instead put
    the Linear in the decoder's final layer and take query 0 after it.)
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        check_dims("outputs", outputs, (3,), "(B, O, in_channels)")
        check_channels("outputs", outputs, self.classifier.in_features)
        # HF projects every query and keeps the first; projecting only it is the same.
        return self.classifier(outputs[:, 0])

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "ClassificationOutputAdapter":
        """From a PerceiverClassificationPostprocessor."""
        adapter = cls(hf_module.classifier.in_features, hf_module.classifier.out_features)
        load(adapter.classifier, hf_module.classifier)
        return adapter.train(hf_module.training)


class EmbeddingDecoderOutputAdapter(nn.Module):
    """Decoder outputs (B, L, C) -> token logits (B, L, vocab_size) = outputs @ embedding.weight.T + bias.

    Shares the weight of `embedding` (e.g. TokenInputAdapter.embeddings): it is
    registered here as a submodule, so tying survives .to() and state dicts.
    (HF PerceiverEmbeddingDecoder.)
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        check_dims("outputs", outputs, (3,), "(B, L, C)")
        check_channels("outputs", outputs, self.embedding.embedding_dim)
        return F.linear(outputs, self.embedding.weight, self.bias)

    @classmethod
    def from_hf(cls, hf_module: nn.Module, embedding: nn.Embedding) -> "EmbeddingDecoderOutputAdapter":
        """From a PerceiverEmbeddingDecoder, tied to `embedding` (ours, already converted)."""
        adapter = cls(embedding)
        with torch.no_grad():
            adapter.bias.copy_(hf_module.bias)
        return adapter.train(hf_module.training)


class ProjectionOutputAdapter(nn.Module):
    """Decoder outputs (B, O, in_channels) -> (B, O, out_channels) by a Linear.

    (HF PerceiverProjectionPostprocessor.)
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.projection = nn.Linear(in_channels, out_channels)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        check_dims("outputs", outputs, (3,), "(B, O, in_channels)")
        check_channels("outputs", outputs, self.projection.in_features)
        return self.projection(outputs)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "ProjectionOutputAdapter":
        """From a PerceiverProjectionPostprocessor."""
        adapter = cls(hf_module.classifier.in_features, hf_module.classifier.out_features)
        load(adapter.projection, hf_module.classifier)
        return adapter.train(hf_module.training)


class AudioOutputAdapter(nn.Module):
    """Decoder outputs (B, O, in_channels), one per patch -> audio samples (B, O * samples_per_patch).

    A Linear predicts each patch's samples; the patches are laid end to end.
    (HF PerceiverAudioPostprocessor.)
    """

    def __init__(self, in_channels: int, samples_per_patch: int):
        super().__init__()
        self.projection = nn.Linear(in_channels, samples_per_patch)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        check_dims("outputs", outputs, (3,), "(B, O, in_channels)")
        check_channels("outputs", outputs, self.projection.in_features)
        return self.projection(outputs).reshape(outputs.shape[0], -1)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "AudioOutputAdapter":
        """From a PerceiverAudioPostprocessor."""
        adapter = cls(hf_module.classifier.in_features, hf_module.classifier.out_features)
        load(adapter.projection, hf_module.classifier)
        return adapter.train(hf_module.training)


class MultimodalOutputAdapter(nn.Module):
    """Decoder outputs of several modalities -> {name: that modality's adapter output}.

    `outputs` is either a dict {name: (B, O_name, C)} or one (B, O, C) tensor holding
    the modalities one after another in sorted name order (as MultimodalInputAdapter
    and HF's multimodal decoder lay them out); the tensor is split by modality_sizes
    {name: O_name}, given to forward or else to the constructor (the decoder's output
    sizes are fixed by its queries). Sizes of modalities without an adapter are only
    used for the split. (HF PerceiverMultimodalPostprocessor.)
    """

    def __init__(self, modalities: Mapping[str, nn.Module], modality_sizes: Optional[Mapping[str, int]] = None):
        super().__init__()
        self.modalities = nn.ModuleDict(modalities)
        self.modality_sizes = dict(modality_sizes) if modality_sizes is not None else None

    def forward(self, outputs: Union[torch.Tensor, Mapping[str, torch.Tensor]],
                modality_sizes: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            outputs = self._split(outputs, modality_sizes if modality_sizes is not None else self.modality_sizes)
        elif not isinstance(outputs, Mapping):
            raise ValueError(f"outputs must be a (B, O, C) tensor or a dict of them, got {type(outputs).__name__}")
        missing = sorted(set(self.modalities) - set(outputs))
        if missing:
            raise ValueError(f"outputs has no modalities {missing}")
        return {name: adapter(outputs[name]) for name, adapter in self.modalities.items()}

    @staticmethod
    def _split(outputs: torch.Tensor, modality_sizes: Optional[Mapping[str, int]]) -> Dict[str, torch.Tensor]:
        if modality_sizes is None:
            raise ValueError("modality_sizes must be given (to forward or the constructor) when outputs is a tensor")
        check_dims("outputs", outputs, (3,), "(B, O, C)")
        names = sorted(modality_sizes)
        sizes = [modality_sizes[name] for name in names]
        if sum(sizes) != outputs.shape[1]:
            raise ValueError(f"outputs has {outputs.shape[1]} positions, but modality_sizes {dict(modality_sizes)} "
                             f"add up to {sum(sizes)}")
        return dict(zip(names, torch.split(outputs, sizes, dim=1)))

    @classmethod
    def from_hf(cls, hf_module: nn.Module, modality_sizes: Optional[Mapping[str, int]] = None
                ) -> "MultimodalOutputAdapter":
        """From a PerceiverMultimodalPostprocessor, converting each modality with output_adapter_from_hf.

        HF's input_is_dict flag is not needed: forward accepts both a dict and a tensor.
        """
        adapter = cls({name: output_adapter_from_hf(module) for name, module in hf_module.modalities.items()},
                      modality_sizes)
        return adapter.train(hf_module.training)


class FlowOutputAdapter(nn.Module):
    """Decoder outputs (B, H*W, C), one per pixel -> flow (B, H, W, C) / rescale_factor.

    output_image_shape is (H, W). The decoder's final Linear to C = 2 flow channels
    belongs to the decoder; this is what HF PerceiverOpticalFlowDecoder does after it.
    """

    def __init__(self, output_image_shape: Sequence[int], rescale_factor: float = 100.0):
        super().__init__()
        if len(output_image_shape) != 2:
            raise ValueError(f"output_image_shape must be (H, W), got {tuple(output_image_shape)}")
        self.output_image_shape = tuple(output_image_shape)
        self.rescale_factor = rescale_factor

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        check_dims("outputs", outputs, (3,), "(B, H*W, C)")
        if outputs.shape[1] != math.prod(self.output_image_shape):
            raise ValueError(f"outputs has {outputs.shape[1]} positions, but output_image_shape "
                             f"{self.output_image_shape} has {math.prod(self.output_image_shape)}")
        flow = outputs / self.rescale_factor
        return flow.reshape(outputs.shape[0], *self.output_image_shape, outputs.shape[-1])

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "FlowOutputAdapter":
        """From a PerceiverOpticalFlowDecoder (its reshape and rescale only)."""
        return cls(hf_module.output_image_shape, hf_module.rescale_factor).train(hf_module.training)


_OUTPUT_ADAPTERS = {
    "PerceiverClassificationPostprocessor": ClassificationOutputAdapter,
    "PerceiverProjectionPostprocessor": ProjectionOutputAdapter,
    "PerceiverAudioPostprocessor": AudioOutputAdapter,
    "PerceiverMultimodalPostprocessor": MultimodalOutputAdapter,
    "PerceiverOpticalFlowDecoder": FlowOutputAdapter,
}


def output_adapter_from_hf(hf_module: nn.Module) -> nn.Module:
    """The output adapter equal to an HF Perceiver postprocessor (or the optical flow decoder's reshape).

    PerceiverEmbeddingDecoder needs the token embedding: use EmbeddingDecoderOutputAdapter.from_hf.
    """
    converter = _OUTPUT_ADAPTERS.get(hf_type(hf_module))
    if converter is None:
        raise TypeError(f"no output adapter for {hf_type(hf_module)}; supported: {sorted(_OUTPUT_ADAPTERS)}")
    return converter.from_hf(hf_module)
