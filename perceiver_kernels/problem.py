"""Input validation for cross_attention and the problem description backends decide on.

Every check names the argument and the expected shape or dtype, so a user who passes
(B, L, H, D) where (B, H, L, D) was meant reads what to fix, not a kernel failure.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Every backend forms the scores q.k * scale in at least float32. Beyond this bound the
# softmax is a hard maximum anyway, and scores of ordinary inputs overflow float32
# (1e38 turns q.k = 10 into inf, and the softmax into NaN), so the bound is an error.
MAX_ABS_SCALE = 2.0**16


class Problem(NamedTuple):
    """What a backend needs to know to accept or refuse a call (no tensor data).

    A NamedTuple: built on every call and the key of dispatch's cache, so it must be
    cheap to make and to hash.
    """

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    num_queries: int
    num_keys: int
    head_dim_qk: int
    head_dim_v: int
    has_mask: bool
    has_residual: bool
    requires_grad: bool
    dropout: bool
    causal: bool = False

    def describe(self) -> str:
        parts = [
            f"B={self.batch} H={self.heads} Nq={self.num_queries} Nk={self.num_keys}",
            f"Dqk={self.head_dim_qk} Dv={self.head_dim_v}",
            str(self.dtype).replace("torch.", ""),
            str(self.device),
        ]
        if self.has_mask:
            parts.append("key_padding_mask")
        if self.has_residual:
            parts.append("residual")
        if self.requires_grad:
            parts.append("requires_grad")
        if self.dropout:
            parts.append("dropout")
        if self.causal:
            parts.append("causal")
        return ", ".join(parts)


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will record a call on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_tensor(name: str, x, expected: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {expected}, got shape {tuple(x.shape)}")


def _check_dtypes_and_devices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be a floating-point tensor (float32, float16 or bfloat16), got {q.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has unsupported dtype {q.dtype}; use float32, float16 or bfloat16")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def _check_mask(key_padding_mask, batch: int, num_keys: int, device: torch.device) -> None:
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (B, Nk), got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True = padding, ignored), got {key_padding_mask.dtype}"
        )
    if key_padding_mask.shape != (batch, num_keys):
        raise ValueError(
            f"key_padding_mask must have shape (B={batch}, Nk={num_keys}), got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask must be on the device of q ({device}), got {key_padding_mask.device}")


def _check_residual(residual, expected: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a tensor of shape (B, H, Nq, Dv), got {type(residual).__name__}")
    if residual.shape != expected:
        raise ValueError(f"residual must have shape (B, H, Nq, Dv) = {expected}, got {tuple(residual.shape)}")
    if residual.dtype != dtype:
        raise TypeError(f"residual must have the dtype of q ({dtype}), got {residual.dtype}")
    if residual.device != device:
        raise ValueError(f"residual must be on the device of q ({device}), got {residual.device}")


def _resolve_scale(scale, head_dim_qk: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim_qk)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and abs(scale) <= MAX_ABS_SCALE):
        raise ValueError(f"scale must be finite with |scale| <= {MAX_ABS_SCALE:g} (larger scales overflow the "
                         f"float32 scores q.k * scale), got {scale}")
    return float(scale)


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: Optional[float],
    dropout_p: float = 0.0,
    causal: bool = False,
) -> tuple[Problem, float]:
    """Checks the arguments of cross_attention; returns the problem and the resolved scale.

    Runs on every call (a few microseconds): the common case passes a handful of cheap
    comparisons, and the messages are only built when a check fails.
    """
    _check_tensor("q", q, "(B, H, Nq, Dqk)")
    _check_tensor("k", k, "(B, H, Nk, Dqk)")
    _check_tensor("v", v, "(B, H, Nk, Dv)")
    dtype, device = q.dtype, q.device
    if dtype not in SUPPORTED_DTYPES or k.dtype is not dtype or v.dtype is not dtype or k.device != device \
            or v.device != device:
        _check_dtypes_and_devices(q, k, v)

    batch, heads, num_queries, head_dim_qk = q.shape
    k_batch, k_heads, num_keys, k_dim = k.shape
    v_batch, v_heads, v_keys, head_dim_v = v.shape
    if k_batch != batch or k_heads != heads or k_dim != head_dim_qk:
        raise ValueError(
            f"k must have shape (B={batch}, H={heads}, Nk, Dqk={head_dim_qk}) to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v_batch != batch or v_heads != heads or v_keys != num_keys:
        raise ValueError(
            f"v must have shape (B={batch}, H={heads}, Nk={num_keys}, Dv) to match q and k, got {tuple(v.shape)}"
        )
    if head_dim_qk < 1 or head_dim_v < 1:
        raise ValueError(f"head dims must be at least 1, got Dqk={head_dim_qk} (q, k) and Dv={head_dim_v} (v)")
    if key_padding_mask is not None:
        _check_mask(key_padding_mask, batch, num_keys, device)
    if residual is not None:
        _check_residual(residual, (batch, heads, num_queries, head_dim_v), dtype, device)
    scale = _resolve_scale(scale, head_dim_qk)
    if dropout_p != 0.0 or type(dropout_p) is not float:
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
            raise TypeError(f"dropout_p must be a Python float, got {type(dropout_p).__name__}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if causal is not False and causal is not True:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    requires_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (residual is not None and residual.requires_grad))
    problem = Problem(device, dtype, batch, heads, num_queries, num_keys, head_dim_qk, head_dim_v,
                      key_padding_mask is not None, residual is not None, requires_grad, dropout_p > 0.0, causal)
    return problem, scale


def allocate_output(q: torch.Tensor, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, Dv) laid out as (B, Nq, H, Dv), and lse (B, H, Nq) in fp32.

    The (B, Nq, H, Dv) memory layout makes the usual merge of heads,
    out.transpose(1, 2).reshape(B, Nq, H * Dv), free of copies. Kernel backends and
    their fake (meta) implementations both allocate here, so their strides agree.
    """
    batch, heads, num_queries, _ = q.shape
    out = torch.empty((batch, num_queries, heads, head_dim_v), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((batch, heads, num_queries), dtype=torch.float32, device=q.device)
    return out, lse
