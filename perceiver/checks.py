"""Argument checks shared by the model layer: every error names the argument and what it accepts.

Constructor arguments are checked when a module is built, so that a bad setting fails
at once and not at the first forward (which may come after a long data pipeline).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

import perceiver_kernels as pk


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")


def check_dropout(name: str, p: float) -> None:
    """An attention-probability dropout rate: [0, 1) like the op's dropout_p."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


def check_backend(backend: str) -> None:
    if backend not in pk.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {pk.BACKEND_NAMES}, got {backend!r}")


def check_dims(name: str, tensor: torch.Tensor, dims: Sequence[int], expected: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {expected}, got {type(tensor).__name__}")
    if tensor.dim() not in dims:
        raise ValueError(f"{name} must be {expected}, got shape {tuple(tensor.shape)}")


def check_channels(name: str, tensor: torch.Tensor, channels: int) -> None:
    if tensor.shape[-1] != channels:
        raise ValueError(f"{name} must have {channels} channels in its last dimension, got shape {tuple(tensor.shape)}")
