"""The compiled extension perceiver_kernels._C: whether it was built, how, and whether it can run.

Nothing here touches the GPU at import time; the first question asked loads the
extension and, for runtime checks, asks the CUDA runtime once.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

from .machine import machine_fact

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


def build_info() -> dict:
    """What was built: {"built": bool, "reason": str, and the extension's own fields}.

    The extension's fields are cuda_version, cuda_archs, build_type, cudart_version
    and attention_kernels (whether this build carries the CUDA attention kernels).
    """
    module, reason = _load()
    if module is None:
        return {"built": False, "reason": reason}
    return {"built": True, "reason": "", **module.build_info()}


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
            f"the CUDA runtime of perceiver_kernels._C (built with CUDA {module.build_info()['cuda_version']}) "
            f"cannot start: {error}; {detail}"
        )
    if count == 0:
        return "no CUDA device is visible"
    return ""


@machine_fact
def build_problem() -> str:
    """Why the built extension cannot serve attention at all, or "" if it can."""
    module, reason = _load()
    if module is None:
        return reason
    if not module.build_info()["attention_kernels"]:
        return "this build of perceiver_kernels._C carries no attention kernels yet"
    return ""
