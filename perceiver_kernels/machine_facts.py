"""Facts about the machine (what is installed, built, visible) as compile-time constants."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def machine_fact(fact: Callable[..., str]) -> Callable[..., str]:
    """Caches a fact per argument tuple and marks it constant for torch.compile.

    Backends ask such facts on every call; tracing into importlib, the extension or
    the CUDA runtime would break a compiled graph, and the answers cannot change
    while the process runs. (functools.lru_cache would hide the marker from Dynamo.)
    """
    answers: dict[tuple, str] = {}

    @functools.wraps(fact)
    def cached(*args) -> str:
        if args not in answers:
            answers[args] = fact(*args)
        return answers[args]

    return torch.compiler.assume_constant_result(cached)
