"""Inputs and the tolerance rule shared by the op tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perceiver_kernels import reference_attention_with_lse

# docs/DESIGN.md: the fused error against float64 may be at most 2x the error of plain
# PyTorch in the same dtype, plus this small epsilon.
EPSILON = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Case:
    batch: int = 2
    heads: int = 2
    num_queries: int = 7
    num_keys: int = 129
    head_dim_qk: int = 16
    head_dim_v: int = 16
    dtype: torch.dtype = torch.float32
    mask: bool = False
    residual: bool = False
    transposed: bool = False  # q, k, v, residual as (B, L, H, D) tensors viewed as (B, H, L, D)
    scale: float | None = None


def make_inputs(case: Case, device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(length, dim):
        shape = (case.batch, length, case.heads, dim) if case.transposed else (case.batch, case.heads, length, dim)
        x = torch.randn(shape, generator=generator).to(device=device, dtype=case.dtype)
        return x.transpose(1, 2) if case.transposed else x

    inputs = {
        "q": randn(case.num_queries, case.head_dim_qk),
        "k": randn(case.num_keys, case.head_dim_qk),
        "v": randn(case.num_keys, case.head_dim_v),
        "key_padding_mask": None,
        "residual": None,
        "scale": case.scale,
    }
    if case.mask:
        mask = torch.rand((case.batch, case.num_keys), generator=generator) < 0.4
        mask[0] = True  # every query of batch 0 has only padding keys: out must be 0 (+ residual)
        inputs["key_padding_mask"] = mask.to(device)
    if case.residual:
        inputs["residual"] = randn(case.num_queries, case.head_dim_v)
    return inputs


def max_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item() if x.numel() else 0.0


def assert_matches_reference(out: torch.Tensor, inputs: dict, lse: torch.Tensor | None = None,
                             epsilon: dict | None = None) -> None:
    """The tolerance rule of docs/DESIGN.md, plus lse against the float64 reference.

    epsilon: per-dtype epsilons of the rule (a runner's own; EPSILON by default).
    inputs may carry "causal"."""
    truth, truth_lse = reference_attention_with_lse(**inputs, upcast=True)
    plain, _ = reference_attention_with_lse(**inputs)
    assert out.shape == truth.shape and out.dtype == inputs["q"].dtype
    assert not out.isnan().any(), "output has NaN (unwritten or all-masked rows mishandled)"
    error, plain_error = max_error(out, truth), max_error(plain, truth)
    bound = 2 * plain_error + (epsilon or EPSILON)[out.dtype]
    assert error <= bound, f"max error {error:.3g} > 2 x plain PyTorch {plain_error:.3g} + eps"
    if lse is not None:
        assert torch.equal(torch.isinf(lse), torch.isinf(truth_lse)), "lse must be -inf exactly on rows without keys"
        # lse depends only on q.k, which every backend accumulates in fp32 from the
        # exact input values, so it is fp32-accurate whatever the input dtype.
        finite = torch.isfinite(truth_lse)
        if finite.any():
            scale = 1 + truth_lse[finite].abs().max().item()
            assert max_error(lse[finite], truth_lse[finite]) <= 1e-5 * scale


def far_keys_inputs(heads: int = 2, num_keys: int = 2**25, dim: int = 64) -> tuple[dict, dict]:
    """Inputs whose answer lies beyond 32-bit element offsets, and the same answer's small inputs.

    K and V of 2^25 keys x 64 channels x 2 heads by default (fp16, on the GPU): element
    offsets reach 2^32. Only the last 1000 keys can be attended, so the answer depends on
    the far end of K/V and equals attention over just those keys.
    """
    q = torch.randn(1, heads, 16, dim, device="cuda", dtype=torch.float16)
    k = torch.randn(1, heads, num_keys, dim, device="cuda", dtype=torch.float16)
    v = torch.randn(1, heads, num_keys, dim, device="cuda", dtype=torch.float16)
    mask = torch.ones(1, num_keys, dtype=torch.bool, device="cuda")
    mask[0, -1000:] = False
    full = dict(q=q, k=k, v=v, key_padding_mask=mask, residual=None, scale=dim ** -0.5)
    tail = dict(q=q, k=k[:, :, -1000:], v=v[:, :, -1000:], key_padding_mask=None, residual=None, scale=None)
    return full, tail


def strided_inputs(device, dtype: torch.dtype, num_queries: int) -> dict:
    """Inputs with unusual strides: a batch stride below the head stride (q), a channel
    stride of 2 (k, every other channel of a wider tensor), Dv as the slowest dimension
    of v, a transposed residual and a strided mask."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 3, 150, 64, generator=g).to(device, dtype)
    q = torch.randn(3, 2, num_queries, 32, generator=g).to(device, dtype).transpose(0, 1)
    v = torch.randn(2, 24, 150, 3, generator=g).to(device, dtype).permute(0, 3, 2, 1)
    residual = torch.randn(2, 3, 24, num_queries, generator=g).to(device, dtype).transpose(-1, -2)
    mask = (torch.rand(2, 300, generator=g) < 0.3).to(device)[:, ::2]
    inputs = dict(q=q, k=wide[..., ::2], v=v, key_padding_mask=mask, residual=residual, scale=None)
    assert not (inputs["k"].is_contiguous() or v.is_contiguous() or mask.is_contiguous())
    return inputs


def nan_padding_inputs(case: Case, device) -> tuple[dict, dict]:
    """Inputs of a case (with a mask) whose padding keys hold NaN: see poison_padding."""
    return poison_padding(make_inputs(Case(**{**case.__dict__, "mask": True}), device))


def poison_padding(inputs: dict) -> tuple[dict, dict]:
    """The inputs with NaN written into the padding keys of k and v (in place), and the
    same inputs with 0 there (the answer must not change: padding keys are ignored)."""
    mask = inputs["key_padding_mask"][:, None, :].expand(-1, inputs["k"].shape[1], -1)
    inputs["k"][mask] = float("nan")
    inputs["v"][mask] = float("nan")
    return inputs, dict(inputs, k=inputs["k"].nan_to_num(0.0), v=inputs["v"].nan_to_num(0.0))
