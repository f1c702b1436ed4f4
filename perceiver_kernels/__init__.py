"""perceiver_kernels: fused asymmetric cross-attention for Perceiver IO.

    out = perceiver_kernels.cross_attention(q, k, v, key_padding_mask=..., residual=...)
    print(perceiver_kernels.explain(q, k, v))   # which backend runs, and why

Importing the package touches no GPU and compiles nothing.
"""

from .api import cross_attention, explain
from .cuda.extension import build_info
from .dispatch import BACKEND_NAMES, BackendRefusedError, Explanation
from .reference import reference_attention, reference_attention_with_lse

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "BackendRefusedError",
    "Explanation",
    "build_info",
    "cross_attention",
    "explain",
    "reference_attention",
    "reference_attention_with_lse",
]
