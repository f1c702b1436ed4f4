"""What "auto" chooses on a GPU, from the measured H200 run (perceiver_kernels/backends/auto_policy.py).

Checked on the CPU with Problems that say "cuda": the choice is a function of the
shape, and the anchors' outcomes are the measurements it encodes.
"""

import pytest
import torch

from perceiver_kernels.backends import auto_policy
from perceiver_kernels.backends.triton_backend import TritonBackend
from perceiver_kernels.problem import Problem


def problem(batch, heads, num_queries, num_keys, *, mask=False, residual=False, grad=False, dims=(64, 64)):
    return Problem(device=torch.device("cuda", 0), dtype=torch.bfloat16, batch=batch, heads=heads,
                   num_queries=num_queries, num_keys=num_keys, head_dim_qk=dims[0], head_dim_v=dims[1],
                   has_mask=mask, has_residual=residual, requires_grad=grad, dropout=False)


# (name, problem, kernels faster on the H200): every anchor of benchmarks/results/2026-12-01-h200-run2
# (full size: forward, and forward+backward where marked "training"), and of the first run (ENC-5, DEC-3,
# latent self-attention). Wins within 6% count as SDPA's (auto_policy's docstring).
ANCHORS = [
    ("ENC-1", problem(8, 8, 256, 50_176), False),
    ("ENC-1, training", problem(8, 8, 256, 50_176, grad=True), False),
    ("ENC-1 masked", problem(8, 8, 256, 50_176, mask=True), False),
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


@pytest.fixture(autouse=True)
def an_h200(monkeypatch):
    monkeypatch.setattr(auto_policy, "multiprocessor_count", lambda device: 132)


@pytest.mark.parametrize("name,shape,kernels_faster", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_auto_follows_the_measured_winner_of_every_anchor(name, shape, kernels_faster):
    assert auto_policy.kernels_measured_faster(shape) == kernels_faster


def test_the_triton_backend_declines_under_auto_only_and_says_why(monkeypatch):
    from perceiver_kernels.backends import triton_backend

    monkeypatch.setattr(triton_backend, "_machine_refusal", lambda device_type: "")
    monkeypatch.setattr(triton_backend, "_bfloat16_refusal", lambda device_type, index: "")
    backend = TritonBackend()
    enc1 = problem(8, 8, 256, 50_176)
    assert auto_policy.SDPA_FASTER in backend.refusals(enc1, auto=True)
    assert backend.refusals(enc1, auto=False) == []
    assert backend.refusals(problem(1, 8, 256, 400_000, mask=True), auto=True) == []
