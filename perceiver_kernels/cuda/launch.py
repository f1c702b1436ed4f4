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

from types import ModuleType
from typing import Optional

import torch

from ..kernel_launch import SplitPlan, allocate_output, cdiv, on_device, plan_splits
from ..problem import Call, Problem
from . import extension as built_extension

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def plan_forward(problem: Problem, num_splits: Optional[int] = None,
                 extension: Optional[ModuleType] = None) -> SplitPlan:
    """The split plan of the CUDA forward (kernel_launch.plan_chunks); blocks take the
    kernel's query rows of this dtype, and the wide kernels' blocks each one slice of Dv
    (as many blocks per query tile as slices), which the plan counts as programs."""
    # The built extension's info as cached (build_info() copies it; this runs every call).
    info = built_extension._build_info() if extension is None else extension.build_info()
    dtype = DTYPE_NAMES[problem.dtype]
    tile_rows = info["query_tile_rows"][dtype]
    slices = cdiv(problem.head_dim_v, info["forward_wide_head_dims"]["value_channels_per_block"][dtype])
    programs = cdiv(problem.num_queries, tile_rows) * slices * problem.batch * problem.heads
    return plan_splits(programs, problem.num_keys, tile_rows, problem.device, num_splits)


def run_forward(call: Call, num_splits: Optional[int] = None,
                extension: Optional[ModuleType] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the CUDA forward on a validated call; returns (out, lse natural-log)."""
    problem, q, k, v, key_padding_mask, residual = call
    out, lse = allocate_output(q, problem.head_dim_v)
    plan = plan_forward(problem, num_splits, extension)
    extension = extension or built_extension.module()
    partial_out = partial_lse = None
    if plan.num_splits > 1:
        batch_heads = problem.batch * problem.heads
        partial_out = torch.empty((batch_heads, plan.num_splits, problem.num_queries, problem.head_dim_v),
                                  dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch_heads, plan.num_splits, problem.num_queries), dtype=torch.float32,
                                  device=q.device)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None

    def pointer(x: Optional[torch.Tensor]) -> int:
        return 0 if x is None else x.data_ptr()

    def strides(x: Optional[torch.Tensor]) -> tuple[int, ...]:
        return () if x is None else x.stride()

    device, stream = (q.device.index, torch.cuda.current_stream(q.device).cuda_stream) if q.is_cuda else (0, 0)
    # The tensors' device made current as torch does it; the extension would otherwise
    # switch devices itself, and cudaSetDevice creates contexts.
    with on_device(q):
        extension.forward(
            dtype=DTYPE_NAMES[problem.dtype], device=device, stream=stream,
            q=q.data_ptr(), q_stride=q.stride(), k=k.data_ptr(), k_stride=k.stride(), v=v.data_ptr(),
            v_stride=v.stride(), key_padding=pointer(mask), key_padding_stride=strides(mask),
            residual=pointer(residual), residual_stride=strides(residual),
            out=out.data_ptr(), out_stride=out.stride(), lse=lse.data_ptr(),
            partial_out=pointer(partial_out), partial_lse=pointer(partial_lse),
            batch=problem.batch, heads=problem.heads, num_queries=problem.num_queries, num_keys=problem.num_keys,
            head_dim_qk=problem.head_dim_qk, head_dim_v=problem.head_dim_v, scale=problem.scale,
            num_splits=plan.num_splits, keys_per_split=plan.keys_per_split, causal=problem.causal,
        )
    return out, lse
