"""The backends of cross_attention, as pairs of a forward and a backward, and the order
"auto" tries them in."""

from ..cuda import backend as cuda
from ..torch.backend import TorchBackend
from ..triton import backend as triton
from .base import Backend, KernelBackend

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    KernelBackend("triton", triton.FORWARD, triton.BACKWARD),
    # The CUDA forward trains through the Triton backward, from the CUDA forward's lse.
    KernelBackend("cuda", cuda.FORWARD, triton.BACKWARD),
    TorchBackend(),
)}

# "auto" takes the first backend that accepts the input and that policy.py does not
# decline: the fused kernels first; "torch" accepts everything, so "auto" always finds one.
AUTO_PRIORITY: tuple[str, ...] = ("triton", "cuda", "torch")

__all__ = ["AUTO_PRIORITY", "BACKENDS", "Backend"]
