"""The backends of cross_attention and the order "auto" tries them in."""

from .base import Backend
from .cuda_backend import CudaBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudaBackend(), TorchBackend())}

# "auto" takes the first backend that accepts the input. The fused kernels come
# first; "torch" accepts everything, so "auto" always finds one.
AUTO_PRIORITY: tuple[str, ...] = ("triton", "cuda", "torch")

__all__ = ["AUTO_PRIORITY", "BACKENDS", "Backend"]
