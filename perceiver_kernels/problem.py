"""One call of cross_attention, described once: validation builds it, everything below reads it.

`Problem` is what a call is (shapes, dtype, device, flags, scale), without tensor data:
hashable, so it is the key of every cache below the API (the backend chosen, the split
plan, the launch configs and grids). `Call` is a problem with its validated tensors;
backends and launchers take a Call and read both from it, so no argument list is spelled
again at each layer. explain() and the call itself read the same Problem.

Every check names the argument and the expected shape or dtype, so a user who passes
(B, L, H, D) where (B, H, L, D) was meant reads what to fix, not a kernel failure.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Whether PyTorch lets float32 matrix products run on TF32 tensor cores: the setting behind
# torch.backends.cuda.matmul.allow_tf32, read without that property's Python dispatch
# (half a microsecond, on every float32 call).
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)

# Every backend forms the scores q.k * scale in at least float32. Beyond this bound the
# softmax is a hard maximum anyway, and scores of ordinary inputs overflow float32
# (1e38 turns q.k = 10 into inf, and the softmax into NaN), so the bound is an error.
MAX_ABS_SCALE = 2.0**16


class Problem(NamedTuple):
    """What a call is, without its tensors: the key of dispatch's and the launchers' caches.

    A NamedTuple: built on every call, so it must be cheap to make and to hash.
    """

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    num_queries: int
    num_keys: int
    head_dim_qk: int
    head_dim_v: int
    has_mask: bool = False
    has_residual: bool = False
    requires_grad: bool = False
    causal: bool = False
    scale: float = 1.0  # resolved: 1/sqrt(Dqk) unless given
    dropout_p: float = 0.0
    # float32 inputs may run on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32
    # at the call, as in PyTorch); always False for other dtypes.
    tf32: bool = False

    @property
    def exact_fp32(self) -> bool:
        """float32 computed to float32 accuracy (the kernels' dots on CUDA cores)."""
        return self.dtype == torch.float32 and not self.tf32

    @property
    def dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def max_head_dim(self) -> int:
        return max(self.head_dim_qk, self.head_dim_v)

    @property
    def decode(self) -> bool:
        """DECODE-shaped: many more queries than keys (Perceiver IO's output queries over latents)."""
        return self.num_queries >= 4 * self.num_keys

    @property
    def encode(self) -> bool:
        """ENCODE-shaped: many more keys than queries (latents over the inputs)."""
        return self.num_keys >= 4 * self.num_queries

    def describe(self) -> str:
        parts = [
            f"B={self.batch} H={self.heads} Nq={self.num_queries} Nk={self.num_keys}",
            f"Dqk={self.head_dim_qk} Dv={self.head_dim_v}",
            str(self.dtype).replace("torch.", ""),
            str(self.device),
        ]
        flags = (("key_padding_mask", self.has_mask), ("residual", self.has_residual),
                 ("requires_grad", self.requires_grad), ("dropout", self.dropout), ("causal", self.causal),
                 ("tf32", self.tf32))
        return ", ".join(parts + [name for name, on in flags if on])


class Call(NamedTuple):
    """A validated call: its Problem and its tensors (mask and residual may be None)."""

    problem: Problem
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]

    def without_residual(self) -> "Call":
        """The same call with the residual left to the caller (added outside a kernel)."""
        return Call(self.problem._replace(has_residual=False), self.q, self.k, self.v, self.key_padding_mask, None)


def describe_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], scale: float, causal: bool, requires_grad: bool,
                     dropout_p: float = 0.0, tf32: Optional[bool] = None) -> Problem:
    """The Problem of tensors known to be valid (validate() checked them, or a kernel's
    custom op receives them back from a traced graph). tf32: whether float32 may run on
    TF32 tensor cores; by default PyTorch's setting now."""
    batch, heads, num_queries, head_dim_qk = q.shape
    dtype = q.dtype
    if dtype is torch.float32:
        tf32 = _allow_tf32() if tf32 is None else tf32
    else:
        tf32 = False
    return Problem(q.device, dtype, batch, heads, num_queries, k.shape[2], head_dim_qk, v.shape[3],
                   key_padding_mask is not None, residual is not None, requires_grad, causal, scale, dropout_p, tf32)


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
) -> Call:
    """Checks the arguments of cross_attention; returns the call they describe.

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
        dropout_p = float(dropout_p)
    if causal is not False and causal is not True:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    requires_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (residual is not None and residual.requires_grad))
    problem = describe_tensors(q, k, v, key_padding_mask, residual, scale, causal, requires_grad, dropout_p)
    return Call(problem, q, k, v, key_padding_mask, residual)
