"""The backward contract (docs/DESIGN.md), checked once for every backward runner.

Gradients of q, k and v from a runner's forward (its out and lse) and the Triton
backward, against autograd of the float64 reference under the tolerance rule, with
outputs poisoned with NaN. "chunks" forces how the summed dimension of each backward
kernel is cut: 1 (gradients written in place) or 3 (fp32 partials reduced afterwards).
"""

from __future__ import annotations

import pytest
import torch

import perceiver_kernels as pk
from tests.attention_cases import EPSILON, Case, make_inputs, max_error, nan_padding_inputs
from tests.kernel_runners import BACKWARD_RUNNERS
from tests.test_forward_contract import HEAD_DIMS, NUM_KEYS, NUM_QUERIES

pytestmark = pytest.mark.usefixtures("poisoned_empty")

DIFFERENTIABLE = ("q", "k", "v", "residual")


def reference_gradients(inputs, dout, upcast):
    dtype = torch.float64 if upcast else inputs["q"].dtype
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in DIFFERENTIABLE if inputs[name] is not None}
    out = pk.reference_attention(**{**inputs, **leaves})  # inputs may carry "causal"
    return dict(zip(leaves, torch.autograd.grad(out, tuple(leaves.values()), dout.to(dtype))))


def assert_gradients_match(grads: dict, inputs: dict, dout: torch.Tensor, epsilon: dict | None = None) -> None:
    """The tolerance rule, with the epsilon scaled by the largest true gradient of the call.

    Gradients are sums over up to Nq or Nk terms, so their rounding noise grows with
    their magnitude; where plain PyTorch happens to be exact (one key: dK is exactly
    0), an absolute epsilon would demand more than fp32 can give.
    """
    truth = reference_gradients(inputs, dout, upcast=True)
    plain = reference_gradients(inputs, dout, upcast=False)
    magnitude = max(1.0, *(max_error(g, torch.zeros_like(g)) for g in truth.values()))
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        assert not grad.isnan().any(), f"d{name} has NaN"
        error, plain_error = max_error(grad, truth[name]), max_error(plain[name], truth[name])
        bound = 2 * plain_error + (epsilon or EPSILON)[grad.dtype] * magnitude
        assert error <= bound, f"d{name}: max error {error:.3g} > 2 x plain PyTorch {plain_error:.3g} + eps"


def _grid(runner):
    """The forward grid's shapes, the dtype taking turns (as in the forward)."""
    i = 0
    for nq in NUM_QUERIES:
        for nk in NUM_KEYS:
            for dqk, dv in HEAD_DIMS:
                turn = i + i // len(HEAD_DIMS)
                i += 1
                for dtype in (runner.dtypes[turn % len(runner.dtypes)],):
                    cells = runner.forward.max_fp32_cells
                    if dtype == torch.float32 and cells and nq * nk > cells:
                        dtype = torch.float16
                    case = Case(batch=2, heads=2, num_queries=nq, num_keys=nk, head_dim_qk=dqk, head_dim_v=dv,
                                dtype=dtype, mask=True, residual=True, transposed=True)
                    yield runner.param(case, id_suffix=f"-q{nq}-k{nk}-d{dqk}x{dv}-{str(dtype)[6:]}")


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("runner,case", [p for runner in BACKWARD_RUNNERS for p in _grid(runner)])
def test_gradients_on_the_grid(runner, case, num_chunks):
    inputs = make_inputs(case, runner.device)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, num_chunks), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS])
def test_gradients_of_padding_keys_and_of_rows_without_keys_are_exactly_zero(runner):
    inputs = make_inputs(Case(num_queries=9, num_keys=300, head_dim_v=24, mask=True, residual=True), runner.device)
    dout = torch.randn_like(inputs["residual"])
    padding = inputs["key_padding_mask"]
    for num_chunks in (1, 3):
        grads = runner.gradients(inputs, dout, num_chunks)
        assert torch.count_nonzero(grads["q"][0]) == 0  # batch 0: every key is padding
        assert torch.count_nonzero(grads["k"][0]) == 0 and torch.count_nonzero(grads["v"][0]) == 0
        assert torch.count_nonzero(grads["k"][1][:, padding[1]]) == 0
        assert torch.count_nonzero(grads["v"][1][:, padding[1]]) == 0
        assert torch.count_nonzero(grads["k"][1][:, ~padding[1]]) > 0


@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS])
@pytest.mark.parametrize("num_chunks", [1, 4])
def test_gradients_with_variable_length_masks(runner, num_chunks):
    from tests.test_forward_contract import variable_length_inputs

    inputs = variable_length_inputs(runner.device, dtype=torch.float32, num_queries=100)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, num_chunks), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS])
@pytest.mark.parametrize("num_queries,num_keys", [(1, 300), (300, 1)])
def test_gradients_of_a_single_query_or_a_single_key(runner, num_queries, num_keys):
    inputs = make_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_v=24, residual=True), runner.device)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, None), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS if r.forward.causal])
@pytest.mark.parametrize("num_queries,num_keys", [(70, 70), (20, 700), (300, 129)])
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_gradients_causal(runner, num_queries, num_keys, num_chunks):
    inputs = make_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=32, head_dim_v=48, mask=True,
                              residual=True), runner.device)
    inputs["causal"] = True
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, num_chunks), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS])
@pytest.mark.parametrize("num_queries,num_keys,dtype", [(20, 300, torch.float32), (300, 20, torch.float16)])
def test_gradients_do_not_depend_on_what_padding_keys_hold(runner, num_queries, num_keys, dtype):
    """NaN in the padding keys' k and v gives the same gradients, bit for bit, as zeros
    there: no padding key is read into a product (0 * NaN = NaN)."""
    inputs, clean = nan_padding_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_v=24, dtype=dtype,
                                            residual=True), runner.device)
    dout = torch.randn_like(inputs["residual"])
    for num_chunks in (1, 3):
        grads, expected = runner.gradients(inputs, dout, num_chunks), runner.gradients(clean, dout, num_chunks)
        for name in "qkv":
            assert not grads[name].isnan().any() and torch.equal(grads[name], expected[name]), name


# ---- The untimed ENCODE/DECODE backward (triton/resident_backward.py) ----
# The grid gives it up to 64 resident rows (129 keys for DECODE in 16 bits). These reach
# the benchmark's 256 resident rows with several programs per head, and what the
# contract's cases run in exact fp32, where it declines past 64 resident rows (its
# tiles would spill): variable-length masks over many queries and causal DECODE.

UNTIMED_RUNNERS = [r for r in BACKWARD_RUNNERS if r.variant == "untimed"]


def _resident_plan(inputs: dict, num_chunks):
    """The untimed backward plan of the inputs, which must be the resident backward's."""
    from perceiver_kernels.triton import backward, resident_backward, variants
    from tests.kernel_runners import kernel_call

    with variants.running(variants.UNTIMED):
        plan = backward.plan_backward(kernel_call({**inputs, "residual": None}).problem, num_chunks)
    assert isinstance(plan, resident_backward.ResidentBackward), plan.describe()
    return plan


@pytest.mark.parametrize("runner", [r.param() for r in UNTIMED_RUNNERS])
@pytest.mark.parametrize("num_queries,num_keys,dims", [(256, 1500, (64, 64)), (1500, 256, (40, 24))],
                         ids=["encode", "decode"])
@pytest.mark.parametrize("num_chunks", [None, 3])
def test_untimed_backward_with_256_resident_rows(runner, num_queries, num_keys, dims, num_chunks):
    """All 256 queries (ENC-1, ENC-3) or keys (DEC-1) resident, the other side shared by
    several programs per head (by default: 2 heads over the interpreter's 4 SMs), a
    padding suffix in batch 1 (the ENCODE programs skip it) beside batch 0's padding only."""
    inputs = make_inputs(Case(batch=2, heads=1, num_queries=num_queries, num_keys=num_keys, head_dim_qk=dims[0],
                              head_dim_v=dims[1], dtype=torch.float16, mask=True, residual=True), runner.device)
    inputs["key_padding_mask"][1, num_keys * 4 // 5:] = True
    plan = _resident_plan(inputs, num_chunks)
    assert plan.constexprs["BLOCK_RESIDENT"] == 256 and plan.chunks > 1
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, num_chunks), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in UNTIMED_RUNNERS])
@pytest.mark.parametrize("num_queries,num_keys", [(100, 700), (600, 200)], ids=["encode", "decode"])
@pytest.mark.parametrize("num_chunks", [1, 4])
def test_untimed_backward_with_variable_length_masks_in_16_bits(runner, num_queries, num_keys, num_chunks):
    from tests.test_forward_contract import variable_length_inputs

    inputs = variable_length_inputs(runner.device, dtype=torch.float16, num_queries=num_queries, num_keys=num_keys)
    _resident_plan(inputs, num_chunks)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, num_chunks), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in UNTIMED_RUNNERS])
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_untimed_backward_causal_decode_in_16_bits(runner, num_chunks):
    """The first Nq - Nk = 171 rows see no key: their tiles store dQ = 0 unread."""
    inputs = make_inputs(Case(num_queries=300, num_keys=129, head_dim_qk=32, head_dim_v=48, dtype=torch.float16,
                              mask=True, residual=True), runner.device)
    inputs["causal"] = True
    _resident_plan(inputs, num_chunks)
    dout = torch.randn_like(inputs["residual"])
    grads = runner.gradients(inputs, dout, num_chunks)
    assert_gradients_match(grads, inputs, dout, runner.epsilon)
    assert torch.count_nonzero(grads["q"][:, :, :171]) == 0


@pytest.mark.parametrize("runner", [r.param() for r in UNTIMED_RUNNERS])
@pytest.mark.parametrize("num_queries,num_keys", [(200, 1100), (1100, 200)], ids=["encode", "decode"])
@pytest.mark.parametrize("num_chunks", [None, 3])
def test_untimed_backward_is_deterministic(runner, num_queries, num_keys, num_chunks):
    """Two runs give the same bits: partials summed in a fixed order, no atomics."""
    inputs = make_inputs(Case(heads=1, num_queries=num_queries, num_keys=num_keys, head_dim_qk=64, head_dim_v=64,
                              dtype=torch.float16, mask=True, residual=True), runner.device)
    assert _resident_plan(inputs, num_chunks).chunks > 1  # by default: 2 heads over the interpreter's 4 SMs
    dout = torch.randn_like(inputs["residual"])
    first, second = runner.gradients(inputs, dout, num_chunks), runner.gradients(inputs, dout, num_chunks)
    assert all(torch.equal(first[name], second[name]) for name in "qkv")


# ---- Wide heads (above 256 channels): the wide two-kernel backward ----

# (Dqk, Dv), dtype, causal, (Nq, Nk). 261: not 16-byte aligned, dK/dV and dQ in two
# slices; 100 queries over 40 keys with causal: the first 60 rows see no key; 32/1280:
# five dV slices beside one dK slice; 1280/24: five dK and dQ slices beside one of dV,
# Delta over a narrow Dv; 512/300: both wide and different.
WIDE_GRADIENT_CASES = (
    ((261, 261), torch.float32, False, (40, 100)),
    ((261, 261), torch.float16, True, (100, 40)),
    ((32, 1280), torch.float16, False, (40, 100)),
    ((1280, 24), torch.float32, True, (20, 50)),
    ((512, 300), torch.float16, False, (100, 40)),
)


def _wide_gradient_cases(runner):
    for dims, dtype, causal, shape in WIDE_GRADIENT_CASES:
        if dtype in runner.dtypes and (runner.forward.causal or not causal):
            yield runner.param(dims, dtype, causal, shape,
                               id_suffix=f"-d{dims[0]}x{dims[1]}-{str(dtype)[6:]}-q{shape[0]}-k{shape[1]}"
                                         f"{'-causal' if causal else ''}")


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("runner,dims,dtype,causal,shape",
                         [p for runner in BACKWARD_RUNNERS for p in _wide_gradient_cases(runner)])
def test_gradients_of_wide_heads(runner, dims, dtype, causal, shape, num_chunks):
    inputs = make_inputs(Case(batch=2, heads=2, num_queries=shape[0], num_keys=shape[1], head_dim_qk=dims[0],
                              head_dim_v=dims[1], dtype=dtype, mask=True, residual=True, transposed=True),
                         runner.device)
    inputs["causal"] = causal
    dout = torch.randn_like(inputs["residual"])
    grads = runner.gradients(inputs, dout, num_chunks)
    assert_gradients_match(grads, inputs, dout, runner.epsilon)
    # Batch 0 has only padding keys: every gradient is exactly 0 there.
    assert all(torch.count_nonzero(grads[name][0]) == 0 for name in "qkv")


# ---- GPU-only sizes ----

@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS if r.gpu])
@pytest.mark.parametrize("shape", [(2, 4, 256, 20_000), (2, 4, 20_000, 256)], ids=["encode", "decode"])
def test_gradients_with_default_chunking_on_encode_and_decode_shapes(runner, shape):
    batch, heads, nq, nk = shape
    inputs = make_inputs(Case(batch=batch, heads=heads, num_queries=nq, num_keys=nk, head_dim_qk=64, head_dim_v=64,
                              dtype=torch.bfloat16, mask=True, residual=True), runner.device)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, None), inputs, dout, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in BACKWARD_RUNNERS if r.gpu])
@pytest.mark.parametrize("shape", [(2, 1, 512, 20_000), (2, 1, 20_000, 512)], ids=["encode", "decode"])
def test_gradients_of_wide_heads_with_default_chunking_on_encode_and_decode_shapes(runner, shape):
    batch, heads, nq, nk = shape
    inputs = make_inputs(Case(batch=batch, heads=heads, num_queries=nq, num_keys=nk, head_dim_qk=261, head_dim_v=261,
                              dtype=torch.bfloat16, mask=True, residual=True), runner.device)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(runner.gradients(inputs, dout, None), inputs, dout, runner.epsilon)
