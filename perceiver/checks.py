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


def check_same_batch(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if tensor.shape[0] != other.shape[0]:
        raise ValueError(f"{name} and {other_name} must have the same batch size (dim 0), got {name} of shape "
                         f"{tuple(tensor.shape)} and {other_name} of shape {tuple(other.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, weight: torch.Tensor) -> None:
    """The input's dtype against the weights it meets first. Autocast casts both itself
    (every floating dtype but float64), so there mixed dtypes are what the user meant."""
    if tensor.dtype == weight.dtype:
        return
    if torch.is_autocast_enabled(tensor.device.type) and tensor.dtype != torch.float64:
        return
    wanted = str(tensor.dtype).replace("torch.", "")
    raise TypeError(f"{name} is {tensor.dtype} but the module's weights are {weight.dtype}: convert the module "
                    f"(module.to(torch.{wanted})) or the input ({name}.to({weight.dtype}))")


def check_key_mask(name: str, mask: torch.Tensor, batch: int, num_keys: int, meaning: str) -> None:
    """A (B, Nk) bool mask over the keys; `meaning` is its convention ("True = keep" or
    "True = padding"), stated in every error because the two are opposite."""
    expected = f"a bool tensor of shape (B={batch}, Nk={num_keys}) with {meaning}"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be {expected}, got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch, num_keys):
        raise ValueError(f"{name} must be {expected}, got shape {tuple(mask.shape)}")
