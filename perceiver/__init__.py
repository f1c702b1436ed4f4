"""perceiver: Perceiver IO as plain nn.Modules on top of perceiver_kernels.cross_attention.

Model code uses only the public API of perceiver_kernels: it runs on the CPU through
the "torch" backend and on GPUs through the fused kernels.
"""

from .attention import CrossAttention, MultiHeadAttention
from .layers import MLP, PerceiverLayer, self_attention_layer
from .model import PerceiverDecoder, PerceiverEncoder, PerceiverIO, PerceiverProcessor
from .position import (
    FourierPositionEncoding,
    QueryProvider,
    TensorQueries,
    TrainablePositionEncoding,
    fourier_features,
    linear_positions,
)

__all__ = [
    "CrossAttention",
    "FourierPositionEncoding",
    "MLP",
    "MultiHeadAttention",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverLayer",
    "PerceiverProcessor",
    "QueryProvider",
    "TensorQueries",
    "TrainablePositionEncoding",
    "fourier_features",
    "linear_positions",
    "self_attention_layer",
]
