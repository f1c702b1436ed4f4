"""Launcher of the CUDA C++ kernels (perceiver_kernels._C): split plan, buffers, raw pointers.

The extension takes no torch tensors: this module hands it device pointers, element
strides, sizes and the current stream, and allocates every buffer itself (output,
lse, split partials), so the caching allocator owns all memory. What the plan needs
to know about the kernels (their query rows per block) comes from the extension's
build_info(), so Python and C++ cannot disagree.

The extension is a parameter: the tests hand in the same C++ sources compiled for the
CPU (tests/cuda_emulation/), so this launcher is what they test too.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Optional

import torch

from . import cuda_extension
from .chunking import SplitPlan, cdiv, plan_splits
from .problem import allocate_output

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def plan_cuda_forward(batch: int, heads: int, num_queries: int, num_keys: int, dtype: torch.dtype,
                      device: torch.device, num_splits: Optional[int] = None,
                      extension: Optional[ModuleType] = None, head_dim_v: int = 0) -> SplitPlan:
    """The split plan of the CUDA forward (see chunking.plan_chunks); blocks take the
    kernel's query rows of this dtype, and the wide kernels' blocks each one slice of Dv
    (as many blocks per query tile as slices), which the plan counts as programs."""
    info = cuda_extension.build_info() if extension is None else extension.build_info()
    tile_rows = info["query_tile_rows"][DTYPE_NAMES[dtype]]
    wide = info.get("forward_wide_head_dims")
    slices = cdiv(head_dim_v, wide["value_channels_per_block"][DTYPE_NAMES[dtype]]) if wide and head_dim_v else 1
    return plan_splits(batch * slices, heads, num_queries, num_keys, tile_rows, device, num_splits)


def run_cuda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    num_splits: Optional[int] = None,
    extension: Optional[ModuleType] = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the CUDA forward on validated inputs; returns (out, lse natural-log).
    causal: query i sees key j only if j <= i + Nk - Nq."""
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    out, lse = allocate_output(q, head_dim_v)
    plan = plan_cuda_forward(batch, heads, num_queries, num_keys, q.dtype, q.device, num_splits, extension, head_dim_v)
    extension = extension or cuda_extension.module()
    partial_out = partial_lse = None
    if plan.num_splits > 1:
        partial_out = torch.empty((batch * heads, plan.num_splits, num_queries, head_dim_v),
                                  dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch * heads, plan.num_splits, num_queries), dtype=torch.float32, device=q.device)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None

    def pointer(x: Optional[torch.Tensor]) -> int:
        return 0 if x is None else x.data_ptr()

    def strides(x: Optional[torch.Tensor]) -> tuple[int, ...]:
        return () if x is None else x.stride()

    device, stream = (q.device.index, torch.cuda.current_stream(q.device).cuda_stream) if q.is_cuda else (0, 0)
    # The tensors' device made current as torch does it; the extension would otherwise
    # switch devices itself, and cudaSetDevice creates contexts.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        extension.forward(
            dtype=DTYPE_NAMES[q.dtype], device=device, stream=stream,
            q=q.data_ptr(), q_stride=q.stride(), k=k.data_ptr(), k_stride=k.stride(), v=v.data_ptr(),
            v_stride=v.stride(), key_padding=pointer(mask), key_padding_stride=strides(mask),
            residual=pointer(residual), residual_stride=strides(residual),
            out=out.data_ptr(), out_stride=out.stride(), lse=lse.data_ptr(),
            partial_out=pointer(partial_out), partial_lse=pointer(partial_lse),
            batch=batch, heads=heads, num_queries=num_queries, num_keys=num_keys,
            head_dim_qk=head_dim_qk, head_dim_v=head_dim_v, scale=scale,
            num_splits=plan.num_splits, keys_per_split=plan.keys_per_split, causal=causal,
        )
    return out, lse
