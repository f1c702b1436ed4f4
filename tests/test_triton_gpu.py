"""GPU-only checks of the Triton forward: bfloat16, compiled autotuning, int64 offsets."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.triton_launch import attention_forward
from tests.attention_cases import Case, assert_matches_reference, far_keys_inputs, make_inputs
from tests.test_triton_forward import GRID, PATH_SPLITS, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("path", PATH_SPLITS)
@pytest.mark.parametrize("case", GRID[::3], ids=lambda c: f"q{c.num_queries}-k{c.num_keys}-d{c.head_dim_qk}x{c.head_dim_v}")
def test_bfloat16_grid(case, path, poisoned_empty):
    case = Case(**{**case.__dict__, "dtype": torch.bfloat16})
    inputs = make_inputs(case, "cuda")
    out, lse = run(inputs, path)
    assert_matches_reference(out, inputs, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 8, 256, 50_176), (1, 8, 256, 400_000), (2, 8, 20_000, 256)],
                         ids=["enc1", "enc3", "dec"])
def test_auto_on_perceiver_shapes(shape, dtype):
    batch, heads, nq, nk = shape
    case = Case(batch=batch, heads=heads, num_queries=nq, num_keys=nk, head_dim_qk=64, head_dim_v=64,
                dtype=dtype, mask=True, residual=True, transposed=True)
    inputs = make_inputs(case, "cuda")
    explanation = pk.explain(**inputs)
    assert explanation.chosen == "triton", str(explanation)
    out = pk.cross_attention(**inputs)
    assert_matches_reference(out[:, :, :64], {**inputs, "q": inputs["q"][:, :, :64],
                                              "residual": inputs["residual"][:, :, :64]})


def test_tf32_is_used_only_when_allowed():
    inputs = make_inputs(Case(num_queries=128, num_keys=4096, head_dim_qk=64, head_dim_v=64), "cuda")
    exact, _ = run(inputs, "split")
    fast, _ = run(inputs, "split", allow_tf32=True)
    assert_matches_reference(exact, inputs)
    assert not torch.equal(exact, fast)


def test_offsets_beyond_int32():
    full, tail = far_keys_inputs()
    out, _ = attention_forward(full["q"], full["k"], full["v"], full["key_padding_mask"], None, full["scale"], False)
    assert_matches_reference(out, tail)


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("case", GRID[::3], ids=lambda c: f"q{c.num_queries}-k{c.num_keys}-d{c.head_dim_qk}x{c.head_dim_v}")
def test_bfloat16_backward_grid(case, num_chunks, poisoned_empty):
    from tests.test_triton_backward import assert_gradients_match, run_backward

    inputs = make_inputs(Case(**{**case.__dict__, "dtype": torch.bfloat16}), "cuda")
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(run_backward(inputs, dout, num_chunks), inputs, dout)


def test_backward_with_default_chunking_on_encode_and_decode_shapes():
    from tests.test_triton_backward import assert_gradients_match, run_backward

    for shape in [(2, 4, 256, 20_000), (2, 4, 20_000, 256)]:
        batch, heads, nq, nk = shape
        inputs = make_inputs(Case(batch=batch, heads=heads, num_queries=nq, num_keys=nk, head_dim_qk=64,
                                  head_dim_v=64, dtype=torch.bfloat16, mask=True, residual=True), "cuda")
        dout = torch.randn_like(inputs["residual"])
        assert_gradients_match(run_backward(inputs, dout, None), inputs, dout)
