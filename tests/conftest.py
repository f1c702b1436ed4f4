"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton
reads TRITON_INTERPRET when kernels are decorated, so it is set here, before any
test imports perceiver_kernels.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Makes torch.empty return NaN-filled floating tensors, so an element a kernel
    forgets to write (outputs, lse, split partials) fails the comparison."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.dtype.is_floating_point:
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(architecture, multiprocessors, shared_memory): the machine facts of a GPU
    (perceiver_kernels.machine) for problems on "cuda" devices, with every cache that
    keys on them cleared, so plans and choices can be checked on the CPU."""
    from perceiver_kernels import dispatch, machine
    from perceiver_kernels.triton import backward, configs, forward

    caches = (dispatch._select, forward.plan_forward, backward.plan_backward, configs.choose)

    def clear():
        for cache in caches:
            cache.cache_clear()

    def install(architecture: str = "sm_90", multiprocessors: int = 132, shared_memory: int = 232_448):
        facts = {"architecture": architecture, "multiprocessors": multiprocessors,
                 "shared_memory_per_block": shared_memory}
        interpreter = {"architecture": machine.INTERPRETER, "multiprocessors": machine.INTERPRETER_MULTIPROCESSORS,
                       "shared_memory_per_block": 0}
        for name in facts:
            monkeypatch.setattr(machine, name, lambda device_type, index, name=name:
                                facts[name] if device_type == "cuda" else interpreter[name])
        clear()

    yield install
    clear()
