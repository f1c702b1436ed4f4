"""TMA tensor descriptors: which (B, H, N, D) tensors the CUDA driver lets TMA read, the
host-side descriptors of whole tensors (decode.py, wide.py), and the scratch memory
Triton needs for descriptors that programs build themselves (encode.py).

A tensor's strides and alignment belong to the call, not the Problem, so launchers ask
per call and fall back to pointer loads, same kernel, where TMA cannot read a tensor."""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.runtime import _allocation
from triton.tools.tensor_descriptor import TensorDescriptor


def host_descriptor_fits(x: torch.Tensor) -> bool:
    """Whether a host descriptor can address x (the driver's rules for a tensor map):
    16-byte aligned start, contiguous channels, every other dimension of more than one
    entry strided by a positive multiple of 16 bytes (host_descriptor sets the stride of
    a dimension of one entry)."""
    return x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(
        stride > 0 and stride * x.element_size() % 16 == 0 for size, stride in zip(x.shape[:-1], x.stride()[:-1])
        if size > 1)


def host_descriptor(x: torch.Tensor, block_shape: list[int]) -> TensorDescriptor:
    """A descriptor of all of x, for a tensor host_descriptor_fits."""
    # A dimension of one entry is never stepped: any stride TMA accepts will do.
    strides = [stride if size > 1 else 16 // x.element_size() for size, stride in zip(x.shape[:-1], x.stride()[:-1])]
    return TensorDescriptor(x, list(x.shape), strides + [1], block_shape)


def device_descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether descriptors that programs build per (batch, head) over (N, D) can read
    these tensors: contiguous channels, rows a multiple of 16 bytes apart (the
    descriptor's stride, taken as it is), and every (batch, head) base 16-byte aligned
    (the batch and head strides count where that dimension has more than one index)."""
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.stride(3) != 1 or tensor.data_ptr() % 16 or tensor.stride(2) * size % 16:
            return False
        if any(tensor.shape[dim] > 1 and tensor.stride(dim) * size % 16 for dim in range(2)):
            return False
    return True


def _device_descriptor_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global memory Triton asks for at launch to hold the descriptors that programs
    build (tl.make_tensor_descriptor): 128 bytes per program, from PyTorch's caching
    allocator on the current device and stream."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_device_descriptor_allocator() -> None:
    """Gives Triton an allocator for in-kernel descriptors unless one is set.

    triton.set_allocator is process-global (a ContextVar: per thread and context), and
    an application may have set its own (a memory pool, another library's); replacing
    it would change what its kernels allocate from. So it is set only where none is,
    checked at each launch that builds descriptors, since a new thread starts without one.
    """
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_device_descriptor_scratch)
