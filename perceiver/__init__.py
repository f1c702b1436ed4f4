"""perceiver: Perceiver IO as plain nn.Modules on top of perceiver_kernels.cross_attention.

Model code uses only the public API of perceiver_kernels: it runs on the CPU through
the "torch" backend and on GPUs through the fused kernels.
"""

from .ar import PerceiverAR
from .attention import CrossAttention, MultiHeadAttention, use_backend
from .interop import from_hf
from .layers import MLP, PerceiverLayer, self_attention_layer
from .model import PerceiverDecoder, PerceiverEncoder, PerceiverIO, PerceiverProcessor
from .position import (
    FourierPositionEncoding,
    GridFourierEncoding,
    MultimodalQueries,
    QueryProvider,
    TensorQueries,
    TrainablePositionEncoding,
    fourier_features,
    linear_positions,
)

__all__ = [
    "CrossAttention",
    "FourierPositionEncoding",
    "GridFourierEncoding",
    "MLP",
    "MultimodalQueries",
    "MultiHeadAttention",
    "PerceiverAR",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverLayer",
    "PerceiverProcessor",
    "QueryProvider",
    "TensorQueries",
    "TrainablePositionEncoding",
    "fourier_features",
    "from_hf",
    "linear_positions",
    "self_attention_layer",
    "use_backend",
]
