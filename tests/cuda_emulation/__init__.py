"""Host emulation of the CUDA C++ kernels: builds emulator.cpp with the real kernel
headers and runs them on CPU tensors through ctypes (see emulator.cpp)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from perceiver_kernels.chunking import plan_chunks
from perceiver_kernels.problem import allocate_output

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "csrc" / "attention"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # pk::DType


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's headers (cuda_fp16.h and friends), or None."""
    candidates = [Path(os.environ[var]) / "include" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((path for path in candidates if (path / "cuda_fp16.h").is_file()), None)


def build(directory: Path) -> ctypes.CDLL:
    """Stages the kernel headers with the emulated device_utils.cuh and compiles them."""
    for source in [*KERNELS.glob("*.h"), *KERNELS.glob("*.cuh"), KERNELS / "forward_dispatch.cu"]:
        shutil.copy(source, directory)
    for name in ("device_utils.cuh", "fibers.h", "emulator.cpp"):  # device_utils.cuh replaces the device one
        shutil.copy(HERE / name, directory)
    library = directory / "libemulator.so"
    subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", f"-I{directory}",
         f"-I{cuda_include_dir()}", str(directory / "emulator.cpp"), "-o", str(library)],
        check=True, capture_output=True, text=True,
    )
    return ctypes.CDLL(str(library))


def _strides(x: Optional[torch.Tensor]):
    return None if x is None else (ctypes.c_int64 * x.dim())(*x.stride())


def _pointer(x: Optional[torch.Tensor]):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def forward(
    library: ctypes.CDLL,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: float,
    num_splits: int = 1,
    multiprocessors: int = 132,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA forward path (pk::run_forward) on CPU tensors, on an emulated GPU with
    `multiprocessors` SMs; num_splits is forced (the split planner is Python's)."""
    batch, heads, num_queries, head_dim_qk = q.shape
    num_keys, head_dim_v = v.shape[2], v.shape[3]
    out, lse = allocate_output(q, head_dim_v)
    num_splits, keys_per_split = plan_chunks(1, num_keys, q.device, num_splits)
    partial_out = partial_lse = None
    if num_splits > 1:
        partial_out = torch.empty((batch * heads, num_splits, num_queries, head_dim_v), dtype=torch.float32)
        partial_lse = torch.empty((batch * heads, num_splits, num_queries), dtype=torch.float32)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    error = ctypes.create_string_buffer(256)
    status = library.pk_emulate_forward(
        DTYPE_CODES[q.dtype], _pointer(q), _strides(q), _pointer(k), _strides(k), _pointer(v), _strides(v),
        _pointer(mask), _strides(mask), _pointer(residual), _strides(residual), _pointer(out), _strides(out),
        _pointer(lse), _pointer(partial_out), _pointer(partial_lse),
        batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v,
        ctypes.c_float(scale), num_splits, keys_per_split, multiprocessors, error, len(error),
    )
    if status != 0:
        raise RuntimeError(error.value.decode())
    return out, lse


def plan(library: ctypes.CDLL, dtype: torch.dtype, batch: int, heads: int, num_queries: int, num_keys: int,
         head_dims: tuple[int, int], num_splits: int, keys_per_split: int, multiprocessors: int) -> dict:
    """The launch plan pk::plan_launch makes on the emulated GPU."""
    resident, tiles, grid_x = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    library.pk_emulate_plan(DTYPE_CODES[dtype], batch, heads, num_queries, num_keys, *head_dims, num_splits,
                            keys_per_split, multiprocessors, ctypes.byref(resident), ctypes.byref(tiles),
                            ctypes.byref(grid_x))
    return dict(kv_resident=bool(resident.value), query_tiles_per_block=tiles.value, grid_x=grid_x.value)


__all__ = ["build", "cuda_include_dir", "forward", "plan"]
