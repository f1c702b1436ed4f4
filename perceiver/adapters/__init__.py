"""Input and output adapters: raw task data <-> the (B, M, C) arrays a Perceiver IO works on.

Input adapters map raw inputs (tokens, images, videos, audio, labels) to (B, M, C)
encoder inputs; output adapters map (B, O, C) decoder outputs to task outputs.
Their math equals the Hugging Face `transformers` Perceiver pre- and postprocessors,
and every adapter has a `from_hf(module)` classmethod that builds it from the
corresponding HF module with its settings and weights (`input_adapter_from_hf` and
`output_adapter_from_hf` pick the class from the HF module's type). The converters
only read attributes, so `transformers` is not needed to import this package. Input
adapters live in inputs.py, output adapters in outputs.py; the grid Fourier encoding
beside the other position encodings in perceiver/position.py.
Converted adapters are float32 on the CPU, in the HF module's train/eval mode.
"""

from ..position import GridFourierEncoding
from .inputs import (
    AudioInputAdapter,
    ImageInputAdapter,
    MultimodalInputAdapter,
    OneHotInputAdapter,
    PositionEncoding,
    TokenInputAdapter,
    input_adapter_from_hf,
)
from .outputs import (
    AudioOutputAdapter,
    ClassificationOutputAdapter,
    EmbeddingDecoderOutputAdapter,
    FlowOutputAdapter,
    MultimodalOutputAdapter,
    ProjectionOutputAdapter,
    output_adapter_from_hf,
)

__all__ = [
    "AudioInputAdapter",
    "AudioOutputAdapter",
    "ClassificationOutputAdapter",
    "EmbeddingDecoderOutputAdapter",
    "FlowOutputAdapter",
    "GridFourierEncoding",
    "ImageInputAdapter",
    "MultimodalInputAdapter",
    "MultimodalOutputAdapter",
    "OneHotInputAdapter",
    "PositionEncoding",
    "ProjectionOutputAdapter",
    "TokenInputAdapter",
    "input_adapter_from_hf",
    "output_adapter_from_hf",
]
