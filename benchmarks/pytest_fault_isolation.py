"""pytest plugin for GPU test runs: a test that breaks its process's CUDA context ends that process.

An illegal memory access (or a device-side assert, a launch failure) is sticky: every
later CUDA call in the same process fails, so one faulting kernel would fail every
test after it (the first GPU run lost its tests that way). Loaded with
`-p benchmarks.pytest_fault_isolation` under pytest-xdist (`-n N --max-worker-restart M`),
a worker whose context is broken after a test exits at once: xdist reports that test
as crashed, starts a fresh worker and hands it the rest of the queue. Without xdist the
run stops and says why, rather than failing the remaining tests for the wrong reason.

The check is one torch.cuda.synchronize() after each test, and only in processes that
have initialised CUDA.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import pytest

EXIT_CODE = 86


def cuda_context_broken() -> str:
    """Why this process's CUDA context is unusable, or "" (also when CUDA was never used)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:  # torch.AcceleratorError is a RuntimeError
        return str(error).splitlines()[0]
    return ""


# The checks run after every test; the plugin's own tests add a simulated fault here.
CHECKS: list[Callable[[], str]] = [cuda_context_broken]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    for check in CHECKS:
        reason = check()
        if not reason:
            continue
        message = f"fault isolation: {item.nodeid} left the process unusable ({reason})"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(message + "; ending this worker so that a fresh one runs the rest\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)
        item.session.shouldstop = message + "; the remaining tests would fail for it (run under pytest-xdist)"
        return
