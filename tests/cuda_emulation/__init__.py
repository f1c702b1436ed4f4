"""Host emulation of the CUDA extension: emulator.cpp compiles the extension's real
sources (binding, dispatch, kernels) with g++ into a Python module, which stands in
for perceiver_kernels._C under the real launcher, perceiver_kernels/cuda_launch.py."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # pk::DType


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's headers (cuda_fp16.h and friends), or None."""
    candidates = [Path(os.environ[var]) / "include" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((path for path in candidates if (path / "cuda_fp16.h").is_file()), None)


def unavailable() -> str:
    """Why the emulation cannot be built here, or ""."""
    if shutil.which("g++") is None:
        return "needs g++"
    if cuda_include_dir() is None:
        return "needs the CUDA toolkit's headers"
    if importlib.util.find_spec("pybind11") is None:
        return "needs pybind11 (pip install pybind11)"
    return ""


class EmulatedExtension:
    """perceiver_kernels._C compiled for the CPU, on an emulated GPU of `multiprocessors` SMs.

    forward() takes _C.forward's arguments; the device index it is given is replaced by
    the emulated device, whose index is its number of SMs.
    """

    def __init__(self, module: ModuleType, library: ctypes.CDLL, multiprocessors: int = 132):
        self.module = module
        self.library = library
        self.multiprocessors = multiprocessors

    def __getattr__(self, name):
        return getattr(self.module, name)

    def forward(self, **arguments):
        self.library.pk_emulation_select_device(self.multiprocessors)
        return self.module.forward(**{**arguments, "device": self.multiprocessors})

    def with_multiprocessors(self, multiprocessors: int) -> "EmulatedExtension":
        return EmulatedExtension(self.module, self.library, multiprocessors)

    def plan(self, dtype: torch.dtype, batch: int, heads: int, num_queries: int, num_keys: int,
             head_dims: tuple[int, int], num_splits: int, keys_per_split: int) -> dict:
        """The launch plan pk::plan_launch makes on the emulated GPU: the narrow kernels'
        resident K/V and query tiles per block, the wide kernels' value slices (and
        slice width) and resident query tile, and for all the grid's x, threads and
        shared memory per block."""
        names = ("kv_resident", "query_tiles_per_block", "grid_x", "threads", "shared_bytes", "wide", "value_slices",
                 "slice_channels", "q_resident")
        values = [ctypes.c_int() for _ in names]
        self.library.pk_emulate_plan(DTYPE_CODES[dtype], batch, heads, num_queries, num_keys, *head_dims, num_splits,
                                     keys_per_split, self.multiprocessors, *map(ctypes.byref, values))
        plan = dict(zip(names, (value.value for value in values)))
        for flag in ("kv_resident", "wide", "q_resident"):
            plan[flag] = bool(plan[flag])
        return plan


@functools.lru_cache(maxsize=None)
def build() -> EmulatedExtension:
    """Stages csrc/ with the emulated device_utils.cuh, compiles it once per process."""
    import pybind11

    directory = Path(tempfile.mkdtemp(prefix="pk_cuda_emulation_"))
    shutil.copytree(CSRC, directory, dirs_exist_ok=True)
    for name in ("device_utils.cuh", "fibers.h"):  # device_utils.cuh replaces the device one
        shutil.copy(HERE / name, directory / "attention" / name)
    shutil.copy(HERE / "emulator.cpp", directory)
    library = directory / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    # -Bsymbolic: the module's calls of the CUDA runtime bind to emulator.cpp's stand-ins
    # even where the real libcudart is loaded globally (as a CUDA build of torch does);
    # without it, on a GPU machine they reached the real runtime and aborted.
    result = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-Wl,-Bsymbolic", "-w", f"-I{directory}", f"-I{directory / 'attention'}",
         f"-I{cuda_include_dir()}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
         str(directory / "emulator.cpp"), "-o", str(library)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{result.stderr[-4000:]}")
    spec = importlib.util.spec_from_file_location("_C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return EmulatedExtension(module, ctypes.CDLL(str(library)))


__all__ = ["EmulatedExtension", "build", "cuda_include_dir", "unavailable"]
