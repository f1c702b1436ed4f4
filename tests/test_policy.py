"""What "auto" and the torch backend choose on a GPU (perceiver_kernels/policy.py).

Checked on the CPU with Problems on a "cuda" device and the machine facts of an
invented GPU (conftest.fake_gpu): the choice is a function of the shape and the
architecture, and the anchors' outcomes are the measurements it encodes.
"""

import pytest
import torch

from perceiver_kernels import dispatch, policy
from perceiver_kernels.problem import Problem


def problem(batch, heads, num_queries, num_keys, *, mask=False, residual=False, grad=False, dims=(64, 64),
            dtype=torch.bfloat16, dropout_p=0.0):
    return Problem(torch.device("cuda", 0), dtype, batch, heads, num_queries, num_keys, *dims, has_mask=mask,
                   has_residual=residual, requires_grad=grad, dropout_p=dropout_p)


# (name, problem, kernels faster on the H200): every anchor of benchmarks/results/2026-12-01-h200-run2
# (full size: forward, and forward+backward where marked "training"), and of the first run (ENC-5, DEC-3,
# latent self-attention). Wins within 6% count as SDPA's (policy's docstring).
ANCHORS = [
    ("ENC-1", problem(8, 8, 256, 50_176), False),
    ("ENC-1, training", problem(8, 8, 256, 50_176, grad=True), False),
    ("ENC-1 masked", problem(8, 8, 256, 50_176, mask=True), True),
    ("ENC-1 masked, training", problem(8, 8, 256, 50_176, mask=True, grad=True), True),
    ("DEC-1 masked (not measured: copying 256 keys costs SDPA nothing)", problem(8, 8, 50_176, 256, mask=True),
     False),
    ("ENC-2", problem(1, 16, 2048, 182_528), False),
    ("ENC-3", problem(1, 8, 256, 400_000), False),
    ("ENC-3 masked", problem(1, 8, 256, 400_000, mask=True), True),
    ("ENC-3 masked, training", problem(1, 8, 256, 400_000, mask=True, grad=True), True),
    ("ENC-3, training", problem(1, 8, 256, 400_000, grad=True), False),
    ("ENC-4 d32", problem(8, 8, 256, 50_176, dims=(32, 32)), False),
    ("ENC-1 d128", problem(8, 8, 256, 50_176, dims=(128, 128)), False),
    ("ENC-5 d128", problem(4, 1, 512, 50_176, dims=(128, 128)), False),
    ("ENC M=65536 (1.06x)", problem(1, 8, 256, 65_536), False),
    ("DEC-1", problem(8, 8, 50_176, 256), False),
    ("DEC-1, training", problem(8, 8, 50_176, 256, grad=True), False),
    ("DEC-1 d32", problem(8, 8, 50_176, 256, dims=(32, 32)), True),
    ("DEC-1 d128", problem(8, 8, 50_176, 256, dims=(128, 128)), False),
    ("DEC-1 + residual", problem(8, 8, 50_176, 256, residual=True), True),
    ("DEC-1 + residual, training", problem(8, 8, 50_176, 256, residual=True, grad=True), False),
    ("DEC-2", problem(1, 8, 800_000, 2048), False),
    ("DEC O=1048576", problem(1, 8, 1_048_576, 256), False),
    ("DEC-3 32/160", problem(1, 1, 182_528, 2048, dims=(32, 160)), False),
    ("AR-8k", problem(4, 8, 1024, 8192), False),
    ("AR-64k (1.01x)", problem(1, 8, 1024, 65_536), False),
    ("IMG-261", problem(8, 1, 512, 50_176, dims=(261, 261)), False),
    ("IMG-261 masked (wide kernels, not measured masked)", problem(8, 1, 512, 50_176, mask=True, dims=(261, 261)),
     False),
    ("FLOW-512 decode", problem(1, 1, 182_528, 2048, dims=(512, 512)), False),
    ("latent self-attention", problem(8, 8, 512, 512, dims=(128, 128)), False),
]


@pytest.mark.parametrize("name,shape,kernels_faster", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_auto_follows_the_measured_winner_of_every_anchor_on_an_h200(fake_gpu, name, shape, kernels_faster):
    fake_gpu("sm_90", 132)
    assert (policy.auto_declines("triton", shape) == "") == kernels_faster
    assert policy.auto_declines("cuda", shape)  # slower everywhere it was measured
    assert policy.auto_declines("torch", shape) == ""


@pytest.mark.parametrize("architecture", ["sm_80", "sm_100", "sm_120"])
def test_an_unmeasured_gpu_keeps_sdpa_except_for_the_edge_of_any_chip(fake_gpu, architecture):
    """Rules measured on an H200 do not apply elsewhere: only a key padding mask on a shape
    too small for SDPA to fill the GPU (SDPA's masked kernels do not split the keys)."""
    fake_gpu(architecture, 108)
    for name, shape, _ in ANCHORS:
        declined = policy.auto_declines("triton", shape)
        edge = shape.has_mask and shape.max_head_dim <= 256 and not policy.sdpa_fills_gpu(shape)
        assert (declined == "") == edge, name
        if declined:
            assert f"not measured on this GPU ({architecture})" in declined
    assert policy.torch_route(problem(1, 8, 256, 400_000)) == policy.SDPA_DEFAULT  # flash first: H200 only
    assert policy.torch_route(problem(8, 1, 512, 50_176, dims=(261, 261))) == policy.CHUNKED  # any GPU


def test_dispatch_says_why_auto_declines_and_an_explicit_backend_still_runs(fake_gpu, monkeypatch):
    from perceiver_kernels.triton import backend as triton_backend

    fake_gpu("sm_90", 132)
    monkeypatch.setattr(triton_backend, "_machine_refusal", lambda device_type: "")
    enc1 = problem(8, 8, 256, 50_176)
    assert dispatch.refusals("triton", enc1, auto=False) == []
    (reason,) = dispatch.refusals("triton", enc1, auto=True)
    assert "auto prefers SDPA" in reason and "H200" in reason
    assert dispatch.refusals("triton", problem(1, 8, 256, 400_000, mask=True), auto=True) == []
    assert dispatch.select(enc1, "auto").name == "torch"
    assert dispatch.select(enc1, "triton").name == "triton"


def test_one_threshold_decides_whether_sdpa_fills_the_gpu(fake_gpu):
    """The kernels' masked rule and the torch backend's flash route read the same count:
    SDPA's 64-row query blocks of every head against the SMs."""
    fake_gpu("sm_90", 132)
    assert not policy.sdpa_fills_gpu(problem(1, 8, 256, 400_000))  # ENC-3: 32 blocks
    assert policy.sdpa_fills_gpu(problem(8, 8, 256, 50_176))  # ENC-1: 256 blocks
    assert policy.sdpa_fills_gpu(problem(1, 33, 256, 50_176))  # 132 blocks
    assert not policy.sdpa_fills_gpu(problem(1, 32, 256, 50_176))  # 128 blocks
    assert policy.torch_route(problem(1, 32, 256, 50_176)) == policy.FLASH_FIRST
    assert policy.torch_route(problem(1, 33, 256, 50_176)) == policy.SDPA_DEFAULT


@pytest.mark.parametrize(("device", "dims", "masked", "dropout", "dtype", "batch_heads", "expected"), [
    ("cuda", (261, 261), True, False, torch.bfloat16, 8, policy.CHUNKED),
    ("cuda", (32, 512), False, False, torch.float32, 8, policy.CHUNKED),
    ("cuda", (261, 261), False, True, torch.bfloat16, 8, policy.SDPA_DEFAULT),  # dropout: SDPA's
    ("cuda", (64, 64), False, False, torch.bfloat16, 8, policy.FLASH_FIRST),  # ENC-3: 32 blocks
    ("cuda", (64, 64), False, False, torch.bfloat16, 64, policy.SDPA_DEFAULT),  # ENC-1: 256 blocks
    ("cuda", (64, 64), True, False, torch.bfloat16, 8, policy.SDPA_DEFAULT),  # flash takes no mask
    ("cuda", (64, 64), False, False, torch.float32, 8, policy.SDPA_DEFAULT),  # flash is 16-bit only
    ("cuda", (64, 32), False, False, torch.bfloat16, 8, policy.SDPA_DEFAULT),  # flash needs Dqk = Dv
    ("cpu", (261, 261), False, False, torch.float32, 8, policy.SDPA_DEFAULT),  # measured on a GPU only
])
def test_torch_route_on_an_h200(fake_gpu, device, dims, masked, dropout, dtype, batch_heads, expected):
    fake_gpu("sm_90", 132)
    shape = Problem(torch.device(device), dtype, batch_heads, 1, 256, 400_000, *dims, has_mask=masked,
                    dropout_p=0.1 if dropout else 0.0)
    assert policy.torch_route(shape) == expected
