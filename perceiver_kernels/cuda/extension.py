"""The compiled extension perceiver_kernels._C: whether it was built, how, and whether it can run.

Nothing here touches the GPU at import time; the first question asked loads the
extension and, for runtime checks, asks the CUDA runtime once.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

from .. import machine
from ..machine import machine_fact

NOT_BUILT = (
    "perceiver_kernels._C was not built: no nvcc was found when the package was installed, "
    "the build failed, or PERCEIVER_KERNELS_SKIP_CUDA was set; reinstall with nvcc on PATH "
    "(PERCEIVER_KERNELS_FORCE_CUDA=1 makes a failed build an error)"
)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], str]:
    try:
        return importlib.import_module("perceiver_kernels._C"), ""
    except ImportError as error:
        if getattr(error, "name", None) == "perceiver_kernels._C":
            return None, NOT_BUILT
        return None, f"perceiver_kernels._C is installed but does not load: {error}"


@functools.lru_cache(maxsize=None)
def _build_info() -> dict:
    module, reason = _load()
    if module is None:
        return {"built": False, "reason": reason}
    return {"built": True, "reason": "", **module.build_info()}


def build_info() -> dict:
    """What was built: {"built": bool, "reason": str, and the extension's own fields}.

    The extension's fields are cuda_version, cuda_archs, build_type, cudart_version,
    forward_head_dims (the compiled (Dqk, Dv) pairs), forward_wide_head_dims (what the
    wide kernels take beyond them), query_tile_rows (query rows per block of each
    dtype's kernel), max_batch_heads (the grid's limit on B * H) and max_rows (the
    largest Nq or Nk).
    """
    return dict(_build_info())


@machine_fact
def runtime_problem() -> str:
    """Why the extension cannot run kernels on this machine, or "" if it can."""
    module, reason = _load()
    if module is None:
        return reason
    try:
        count = module.device_count()
    except RuntimeError as error:
        driver = module.driver_version()
        detail = f"driver {driver // 1000}.{driver % 1000 // 10}" if driver else "no CUDA driver installed"
        return (
            f"the CUDA runtime of perceiver_kernels._C (built with CUDA {_build_info()['cuda_version']}) "
            f"cannot start: {error}; {detail}"
        )
    if count == 0:
        return "no CUDA device is visible"
    return ""


@machine_fact
def build_problem() -> str:
    """Why there is no extension to run, or "" if it loaded."""
    return _load()[1]


def module() -> ModuleType:
    """The loaded extension; raises RuntimeError saying why when it is not built."""
    loaded, reason = _load()
    if loaded is None:
        raise RuntimeError(reason)
    return loaded


@machine_fact
def head_dims_problem(head_dim_qk: int, head_dim_v: int) -> str:
    """Why no compiled kernel serves these head dims, or "" if one does."""
    loaded = module()
    if loaded.forward_head_dims(head_dim_qk, head_dim_v) is not None:
        return ""
    info = _build_info()
    pairs = ", ".join(f"{qk}/{v}" for qk, v in info["forward_head_dims"])
    beyond = f", and the wide kernels take any head dims up to {info['forward_wide_head_dims']['max']}"
    return (f"no compiled kernel for Dqk={head_dim_qk} Dv={head_dim_v}; the compiled Dqk/Dv pairs are {pairs} "
            f"(smaller dims run padded up to a pair){beyond}")


@machine_fact
def architecture_problem(device_index: int) -> str:
    """Why this build has no code for the GPU `device_index`, or "" if it has.

    A plain architecture ("80") carries SASS for its major version and PTX that newer
    GPUs compile at load time; an arch-specific one ("90a") runs only on exactly that
    GPU, a family-specific one ("100f") on its major version. The kernels use mma.sync
    with bf16, so they need compute capability 8.0.
    """
    device = machine.capability(machine.architecture("cuda", device_index))
    if device < 80:
        return f"the CUDA kernels need compute capability 8.0 or newer, this GPU has {device // 10}.{device % 10}"
    archs = _build_info()["cuda_archs"].split(",")
    for arch in archs:
        number = int(arch.rstrip("af"))
        exact = arch.endswith("a") and number == device
        family = arch.endswith("f") and number // 10 == device // 10 and number <= device
        if exact or family or (arch.isdigit() and number <= device):
            return ""
    return (f"this build has code for sm_{', sm_'.join(archs)} only, not for this sm_{device} GPU; reinstall with "
            f"PERCEIVER_KERNELS_CUDA_ARCHS=\"{device}\"")
