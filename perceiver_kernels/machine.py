"""Facts about the machine (what is installed, which GPU a device is), asked once and
constant for torch.compile.

Every layer reads the GPU's architecture, SM count and shared memory here and nowhere
else, so a test can make the process believe it runs on another GPU by replacing these
functions (tests/conftest.py: `fake_gpu`).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

Fact = TypeVar("Fact")

# The Triton interpreter (CPU tensors) has no SMs; a small nominal count makes the CPU
# tests exercise the same split heuristics at small sizes.
INTERPRETER_MULTIPROCESSORS = 4
INTERPRETER = "interpreter"


def machine_fact(fact: Callable[..., Fact]) -> Callable[..., Fact]:
    """Caches a fact per argument tuple and marks it constant for torch.compile.

    Tracing into importlib, the extension or the CUDA runtime would break a compiled
    graph, and the answers cannot change while the process runs. (functools.lru_cache
    would hide the marker from Dynamo.) Facts take plain values (a device's type and
    index, not the torch.device), which Dynamo can key a constant on. `cache_clear()`
    forgets the answers (tests that invent a machine).
    """
    answers: dict[tuple, Fact] = {}

    @functools.wraps(fact)
    def cached(*args):
        if args not in answers:
            answers[args] = fact(*args)
        return answers[args]

    cached.cache_clear = answers.clear
    return torch.compiler.assume_constant_result(cached)


@machine_fact
def architecture(device_type: str, device_index) -> str:
    """"sm_XY" of a CUDA device; "interpreter" for CPU tensors (Triton's interpreter)."""
    if device_type != "cuda":
        return INTERPRETER
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


@machine_fact
def multiprocessors(device_type: str, device_index) -> int:
    """SMs of a CUDA device (INTERPRETER_MULTIPROCESSORS for CPU tensors)."""
    if device_type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@machine_fact
def shared_memory_per_block(device_type: str, device_index) -> int:
    """The opt-in shared memory a block may use on a CUDA device; 0 (no limit) elsewhere."""
    if device_type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def capability(architecture: str) -> int:
    """The compute capability of an architecture as a number ("sm_90" -> 90, "sm_100" ->
    100), so that architectures compare in order (as strings "sm_100" < "sm_90"); 0 for
    the interpreter."""
    return int(architecture[3:]) if architecture.startswith("sm_") else 0
