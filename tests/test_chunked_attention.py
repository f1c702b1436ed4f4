"""The torch backend's chunked matrix-product path (perceiver_kernels/torch/chunked.py).

On a GPU the backend takes it for heads over 256 channels; here the route is forced so
that any device (the CPU in CI, the GPU where there is one) runs it through the backend: forward and gradients against
the float64 reference with several chunks and a partial last one, NaN in padding keys,
rows without keys, causal masks, residuals and strided inputs, in every CPU dtype.
"""

from __future__ import annotations

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import policy
from perceiver_kernels.torch import backend as torch_backend
from perceiver_kernels.torch import chunked
from tests.attention_cases import Case, assert_matches_reference, make_inputs, nan_padding_inputs
from tests.conftest import KERNEL_DEVICE
from tests.test_backward_contract import assert_gradients_match

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_ROWS = 5  # 23 queries: four full chunks and a partial one


@pytest.fixture
def chunked_route(monkeypatch):
    """The torch backend takes the chunked path, in chunks of CHUNK_ROWS rows."""
    monkeypatch.setattr(policy, "torch_route", lambda problem: policy.CHUNKED)
    real = chunked.chunked_attention
    monkeypatch.setattr(torch_backend, "chunked_attention",
                        lambda *args: real(*args, chunk_rows=CHUNK_ROWS))


def _call(inputs, causal=False):
    return pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], key_padding_mask=inputs["key_padding_mask"],
                              residual=inputs["residual"], scale=inputs["scale"], causal=causal, backend="torch")


CASES = [
    Case(num_queries=23, num_keys=37, head_dim_qk=261, head_dim_v=261),  # the released image encoder's head
    Case(num_queries=23, num_keys=37, head_dim_qk=40, head_dim_v=24, mask=True, residual=True),
    Case(num_queries=23, num_keys=9, head_dim_qk=8, head_dim_v=20, mask=True, transposed=True, scale=0.3),
]


@pytest.mark.usefixtures("chunked_route")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"d{case.head_dim_qk}x{case.head_dim_v}"
                         f"{'-mask' if case.mask else ''}{'-residual' if case.residual else ''}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_and_gradients_match_the_reference(dtype, case, causal):
    case = Case(**{**case.__dict__, "dtype": dtype})
    # NaN in every padding key and value row (padding never leaks), and the same inputs clean.
    poisoned, inputs = nan_padding_inputs(case, KERNEL_DEVICE) if case.mask else (make_inputs(case, KERNEL_DEVICE),) * 2
    poisoned, inputs = {**poisoned, "causal": causal}, {**inputs, "causal": causal}
    leaves = {name: poisoned[name].detach().requires_grad_() for name in ("q", "k", "v")}
    out = _call({**poisoned, **leaves}, causal)
    assert "matrix products in query chunks" in pk.explain(inputs["q"], inputs["k"], inputs["v"],
                                                           backend="torch").path
    assert_matches_reference(out.detach(), inputs)
    dout = torch.randn_like(out)
    grads = dict(zip("qkv", torch.autograd.grad(out, tuple(leaves.values()), dout)))
    assert_gradients_match(grads, inputs, dout)
    if inputs["key_padding_mask"] is not None:
        padding = inputs["key_padding_mask"][:, None, :, None].expand_as(grads["k"][..., :1])
        assert not grads["k"].masked_select(padding).any() and not grads["v"][..., :1].masked_select(padding).any()
        # Batch element 0 has only padding keys: its rows get 0 (+ residual) and no gradient.
        expected = torch.zeros_like(out[0]) if inputs["residual"] is None else inputs["residual"][0]
        assert torch.equal(out[0].detach(), expected) and not grads["q"][0].any()


@pytest.mark.usefixtures("chunked_route")
def test_nan_padding_inputs_of_the_contract():
    inputs, clean = nan_padding_inputs(Case(num_queries=11, num_keys=30, head_dim_qk=16, head_dim_v=16, mask=True,
                                            residual=True), KERNEL_DEVICE)
    assert_matches_reference(_call(inputs), clean)


def test_chunk_rows_keep_the_scores_of_a_chunk_within_the_budget():
    # IMG-261: 8 batch elements of one head over 50,176 keys: 334 rows of scores in 2^27 elements.
    rows = chunked.rows_per_chunk(8, 1, 50_176)
    assert rows * 8 * 50_176 <= chunked.SCORE_CHUNK_ELEMENTS < (rows + 1) * 8 * 50_176
    assert chunked.rows_per_chunk(1, 1, 10**12) == 1  # never 0 rows
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked.chunked_attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), None, 1.0, False, chunk_rows=0)


def test_one_chunk_and_many_chunks_agree():
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 12)
    whole = chunked.chunked_attention(q, k, v, None, 0.25, True, chunk_rows=40)
    pieces = chunked.chunked_attention(q, k, v, None, 0.25, True, chunk_rows=3)
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("chunked_route")
def test_a_second_derivative_says_it_is_not_supported():
    q, k, v = (torch.randn(1, 2, 6, 8, device=KERNEL_DEVICE) for _ in range(3))
    q.requires_grad_()
    out = pk.cross_attention(q, k, v, backend="torch")
    (grad,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # the first derivative works
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


@pytest.mark.usefixtures("chunked_route")
def test_under_torch_compile_the_wide_route_keeps_sdpa(monkeypatch):
    """The chunked backward runs autograd inside autograd, which a traced graph does not take."""
    calls = []
    monkeypatch.setattr(torch_backend, "chunked_attention", lambda *args: calls.append(args))
    q, k, v = (torch.randn(1, 2, 6, 8, device=KERNEL_DEVICE) for _ in range(3))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(pk.cross_attention(q, k, v, backend="torch"), pk.reference_attention(q, k, v))
    assert calls == []
