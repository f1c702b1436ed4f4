"""The public op: dispatch, explanations, the torch backend, torch.library and torch.compile."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import autograd
from tests.attention_cases import Case, assert_matches_reference, make_inputs
from tests.conftest import HAS_GPU, KERNEL_DEVICE

KERNEL_BACKEND_TESTABLE = pytest.mark.skipif(HAS_GPU, reason="checks the CPU interpreter path")


def test_auto_on_cpu_uses_torch_and_says_why_not_the_kernels():
    inputs = make_inputs(Case(), "cpu")
    explanation = pk.explain(inputs["q"], inputs["k"], inputs["v"])
    assert explanation.chosen == "torch"
    text = str(explanation)
    assert "runs torch" in text and "triton: not used" in text and "cuda: not used" in text
    assert explanation.refusals["triton"] and explanation.refusals["cuda"]


@KERNEL_BACKEND_TESTABLE
def test_interpreter_serves_explicit_triton_only():
    inputs = make_inputs(Case(num_queries=8, num_keys=1100), "cpu")
    assert "interpreter" in " ".join(pk.explain(inputs["q"], inputs["k"], inputs["v"]).refusals["triton"])
    explicit = pk.explain(inputs["q"], inputs["k"], inputs["v"], backend="triton")
    assert explicit.chosen == "triton" and "split-KV" in explicit.path
    out = pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="triton")
    assert_matches_reference(out, inputs)


@pytest.mark.parametrize("dims", [(1281, 1281), (32, 1300), (2048, 64)])
def test_head_dims_above_the_wide_kernels_go_to_another_backend_with_the_reason(dims):
    case = Case(batch=1, heads=1, num_queries=3, num_keys=20, head_dim_qk=dims[0], head_dim_v=dims[1], mask=True)
    inputs = make_inputs(case, KERNEL_DEVICE)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    explanation = pk.explain(q, k, v, key_padding_mask=inputs["key_padding_mask"])
    assert explanation.chosen != "triton"
    assert any("head dims up to 1280" in reason for reason in explanation.refusals["triton"])
    with pytest.raises(pk.BackendRefusedError, match="head dims up to 1280"):
        pk.cross_attention(q, k, v, backend="triton")
    assert_matches_reference(pk.cross_attention(q, k, v, key_padding_mask=inputs["key_padding_mask"]), inputs)


@pytest.mark.parametrize("dims", [(261, 261), (32, 322), (512, 64), (1024, 1024)])
def test_wide_head_dims_train_on_triton_and_explain_says_how(dims):
    from tests.test_backward_contract import DIFFERENTIABLE, assert_gradients_match

    case = Case(batch=1, heads=2, num_queries=3, num_keys=20, head_dim_qk=dims[0], head_dim_v=dims[1], mask=True,
                residual=True)
    inputs = make_inputs(case, KERNEL_DEVICE)
    leaves = {name: inputs[name].detach().requires_grad_() for name in DIFFERENTIABLE}
    args = (leaves["q"], leaves["k"], leaves["v"])
    options = dict(key_padding_mask=inputs["key_padding_mask"], residual=leaves["residual"], backend="triton")
    explanation = pk.explain(*args, **options)
    assert explanation.chosen == "triton", str(explanation)
    assert f"wide head {dims[0]}/{dims[1]}" in explanation.path and "wide-head two-kernel backward" in explanation.path
    out = pk.cross_attention(*args, **options)
    assert_matches_reference(out.detach(), inputs)
    dout = torch.randn_like(out)
    grads = dict(zip(leaves, torch.autograd.grad(out, tuple(leaves.values()), dout)))
    assert_gradients_match(grads, inputs, dout)


def test_explicit_backend_that_cannot_serve_raises_with_reasons():
    inputs = make_inputs(Case(), "cpu")
    with pytest.raises(pk.BackendRefusedError, match="cuda") as raised:
        pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="cuda")
    assert isinstance(raised.value, ValueError)


@KERNEL_BACKEND_TESTABLE
def test_bfloat16_is_refused_by_the_interpreter():
    inputs = make_inputs(Case(dtype=torch.bfloat16), "cpu")
    with pytest.raises(pk.BackendRefusedError, match="bfloat16"):
        pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="triton")


def test_training_through_auto():
    inputs = make_inputs(Case(mask=True, residual=True), KERNEL_DEVICE)
    q = inputs["q"].requires_grad_()
    explanation = pk.explain(q, inputs["k"], inputs["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=inputs["residual"])
    # On a GPU a masked problem this small is one where the kernels beat SDPA (auto_policy).
    assert explanation.chosen == ("triton" if HAS_GPU else "torch"), str(explanation)
    out = pk.cross_attention(q, inputs["k"], inputs["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=inputs["residual"])
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert torch.count_nonzero(q.grad[0]) == 0  # batch 0: every key is padding


def test_dropout_runs_on_the_torch_backend_and_keeps_padding_rows_zero():
    inputs = make_inputs(Case(num_queries=6, num_keys=40, mask=True, residual=True), KERNEL_DEVICE)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    explanation = pk.explain(q, k, v, dropout_p=0.5)
    assert explanation.chosen == "torch"
    assert any("dropout" in reason for reason in explanation.refusals["triton"])
    with pytest.raises(pk.BackendRefusedError, match="dropout"):
        pk.cross_attention(q, k, v, dropout_p=0.5, backend="triton")
    dropped = pk.cross_attention(q, k, v, key_padding_mask=inputs["key_padding_mask"], residual=inputs["residual"],
                                 dropout_p=0.5)
    plain = pk.cross_attention(q, k, v, key_padding_mask=inputs["key_padding_mask"], residual=inputs["residual"])
    assert not torch.allclose(dropped, plain)
    torch.testing.assert_close(dropped[0], inputs["residual"][0], rtol=0, atol=0)


TORCH_CASES = [
    Case(dtype=torch.float32, mask=True, residual=True, transposed=True),
    Case(dtype=torch.float16, num_queries=64, num_keys=5, mask=True),
    Case(dtype=torch.bfloat16, num_queries=1, num_keys=300, residual=True),
    Case(dtype=torch.float64, head_dim_qk=40, head_dim_v=24, mask=True, scale=0.7),
    Case(num_queries=300, num_keys=1, head_dim_qk=261, head_dim_v=261, mask=True),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: f"{str(c.dtype)[6:]}-q{c.num_queries}-k{c.num_keys}")
def test_torch_backend_matches_reference(case):
    inputs = make_inputs(case, "cpu")
    out = pk.cross_attention(inputs.pop("q"), inputs.pop("k"), inputs.pop("v"), backend="torch", **inputs)
    assert_matches_reference(out, make_inputs(case, "cpu"))


def test_all_padding_rows_are_zero_plus_residual_with_zero_gradients():
    inputs = make_inputs(Case(num_queries=6, num_keys=40, mask=True, residual=True), "cpu")
    q, k, v = (inputs[n].detach().requires_grad_() for n in ("q", "k", "v"))
    out = pk.cross_attention(q, k, v, key_padding_mask=inputs["key_padding_mask"], residual=inputs["residual"])
    torch.testing.assert_close(out[0], inputs["residual"][0], rtol=0, atol=0)
    (out * torch.randn_like(out)).sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
        assert torch.count_nonzero(grad[0]) == 0
    padding = inputs["key_padding_mask"][1]
    assert torch.count_nonzero(k.grad[1][:, padding]) == 0 and torch.count_nonzero(v.grad[1][:, padding]) == 0


def test_empty_dimensions():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 5)
    residual = torch.randn(2, 3, 4, 5)
    assert torch.equal(pk.cross_attention(q, k, v, residual=residual), residual)
    assert pk.cross_attention(q[:, :, :0], torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5)).shape == (2, 3, 0, 5)
    # On the device where the Triton kernels run (a CPU tensor on a GPU machine is refused for its device)
    on_kernel_device = [tensor.to(KERNEL_DEVICE) for tensor in (q, k, v)]
    assert "empty" in " ".join(pk.explain(*on_kernel_device, backend="triton").refusals["triton"])


@KERNEL_BACKEND_TESTABLE
def test_custom_op_passes_opcheck():
    inputs = make_inputs(Case(num_queries=5, num_keys=40, head_dim_v=24, mask=True, residual=True), "cpu")
    args = ("triton", inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"], 0.25,
            False, False)
    torch.library.opcheck(autograd.forward_op, args)
    torch.library.opcheck(autograd.forward_op, args[:4] + (None, None, 0.25, True, False))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_traces_the_op(backend):
    # On CPU "triton" runs the custom op in the interpreter, "auto" traces the torch backend.
    inputs = make_inputs(Case(num_queries=5, num_keys=40, head_dim_v=24, mask=True, residual=True), KERNEL_DEVICE)

    def block(q, k, v, mask, residual):
        return torch.tanh(pk.cross_attention(q, k, v, key_padding_mask=mask, residual=residual, backend=backend)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"])
    torch.testing.assert_close(compiled(*args), block(*args))
    # A second length recompiles with dynamic shapes: the fake implementation must follow.
    longer = make_inputs(Case(num_queries=9, num_keys=70, head_dim_v=24, mask=True, residual=True), KERNEL_DEVICE)
    args = (longer["q"], longer["k"], longer["v"], longer["key_padding_mask"], longer["residual"])
    torch.testing.assert_close(compiled(*args), block(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_ignores_whatever_padding_keys_hold(dtype):
    """NaN and Inf in padding keys and values change neither outputs nor gradients."""
    from tests.attention_cases import nan_padding_inputs

    case = Case(num_queries=6, num_keys=40, head_dim_v=24, dtype=dtype, mask=True, residual=True, transposed=True)
    poisoned, clean = nan_padding_inputs(case, "cpu")
    padding = poisoned["key_padding_mask"][:, None, :].expand(-1, case.heads, -1)
    poisoned["v"][padding] = float("inf")
    results = []
    for inputs in (poisoned, clean):
        leaves = {n: inputs[n].detach().requires_grad_() for n in ("q", "k", "v")}
        out = pk.cross_attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=inputs["key_padding_mask"],
                                 residual=inputs["residual"], backend="torch")
        out.backward(torch.ones_like(out))
        results.append((out, *(leaves[n].grad for n in ("q", "k", "v"))))
    for poisoned_result, clean_result in zip(*results):
        assert torch.isfinite(poisoned_result).all()
        torch.testing.assert_close(poisoned_result, clean_result, rtol=0, atol=0)
    _, dq, dk, dv = results[0]
    assert torch.count_nonzero(dq[0]) == 0  # batch 0: every key is padding
    assert torch.count_nonzero(dk[padding]) == 0 and torch.count_nonzero(dv[padding]) == 0


def test_double_backward_through_the_kernels_says_it_is_not_supported():
    inputs = make_inputs(Case(num_queries=5, num_keys=40), KERNEL_DEVICE)
    q = inputs["q"].requires_grad_()
    out = pk.cross_attention(q, inputs["k"], inputs["v"], backend="triton")
    (grad,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported.*reference_attention"):
        grad.sum().backward()
    # What the message offers instead does work.
    q.grad = None
    out = pk.reference_attention(q, inputs["k"], inputs["v"])
    (grad,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    grad.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_explain_and_the_call_agree_when_triton_interpret_is_set_late():
    """TRITON_INTERPRET set after torch (and so triton) was imported cannot take effect:
    explain() must not promise triton, and the call must refuse the same way."""
    import subprocess
    import sys

    script = (
        "import os, torch, perceiver_kernels as pk\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "explanation = pk.explain(q, q, q, backend='triton')\n"
        "assert explanation.chosen == '', str(explanation)\n"
        "try:\n"
        "    pk.cross_attention(q, q, q, backend='triton')\n"
        "except pk.BackendRefusedError as error:\n"
        "    assert 'before the first import of torch' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('the call ran')\n"
    )
    env = {key: value for key, value in __import__("os").environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_output_layout_of_each_backend_is_as_documented():
    """README: the fused kernels lay the output out as (B, Nq, H, Dv), torch as SDPA does."""
    inputs = make_inputs(Case(num_queries=10, num_keys=20, head_dim_v=24, transposed=True), "cpu")
    out = pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="torch")
    assert out.shape == (2, 2, 10, 24) and out.is_contiguous()
    if not HAS_GPU:
        out = pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="triton")
        assert out.shape == (2, 2, 10, 24) and out.transpose(1, 2).is_contiguous()


CAUSAL_SHAPES = [(3, 5), (5, 3), (4, 4), (1, 7), (7, 1), (64, 300)]


@pytest.mark.parametrize("num_queries,num_keys", CAUSAL_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_causal_attention_on_the_torch_backend(num_queries, num_keys, masked, monkeypatch):
    """Bottom-right causal masking, alone and with padding, against the reference, with
    gradients; rows that see no key (Nq > Nk) give the residual and zero gradients. A
    tiny mask-chunk bound makes the padded path build its mask in several chunks."""
    from perceiver_kernels.torch import sdpa

    monkeypatch.setattr(sdpa, "CAUSAL_MASK_CELLS", 2 * num_keys * 3)
    case = Case(num_queries=num_queries, num_keys=num_keys, head_dim_v=24, dtype=torch.float64, mask=masked,
                residual=True)
    inputs = make_inputs(case, "cpu")
    leaves = {n: inputs[n].detach().requires_grad_() for n in ("q", "k", "v")}
    out = pk.cross_attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=inputs["residual"], causal=True, backend="torch")
    reference = {n: inputs[n].detach().requires_grad_() for n in ("q", "k", "v")}
    truth = pk.reference_attention(reference["q"], reference["k"], reference["v"],
                                   key_padding_mask=inputs["key_padding_mask"], residual=inputs["residual"],
                                   causal=True)
    torch.testing.assert_close(out, truth)
    dout = torch.randn_like(out)
    for mine, theirs in zip(torch.autograd.grad(out, tuple(leaves.values()), dout),
                            torch.autograd.grad(truth, tuple(reference.values()), dout)):
        torch.testing.assert_close(mine, theirs)
    blind = max(0, num_queries - num_keys)
    torch.testing.assert_close(out[:, :, :blind], inputs["residual"][:, :, :blind], rtol=0, atol=0)


def test_causal_is_checked_and_every_kernel_backend_serves_it():
    from perceiver_kernels.backends import BACKENDS

    inputs = make_inputs(Case(), "cpu")
    with pytest.raises(TypeError, match="causal must be a bool"):
        pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], causal=1)
    explanation = pk.explain(inputs["q"], inputs["k"], inputs["v"], causal=True, backend="torch")
    assert explanation.chosen == "torch" and "causal" in str(explanation)
    problem = explanation.problem._replace(device=torch.device("cuda", 0), requires_grad=True)
    for name in ("triton", "cuda"):
        backend = BACKENDS[name]
        for implementation in (backend.forward, backend.backward):
            assert implementation.capabilities.causal, name
            assert not implementation.capabilities.refusals(problem, name), name


@pytest.mark.parametrize("user_setting", [True, False])
def test_the_flash_first_route_leaves_cudnn_out_of_the_call_only(monkeypatch, user_setting):
    """The torch backend's flash route switches SDPA's cuDNN off around its call (two flag
    calls: the sdpa_kernel context cost 11 us a call) and back to the user's setting."""
    from perceiver_kernels import policy
    from perceiver_kernels.torch import sdpa

    monkeypatch.setattr(policy, "torch_route", lambda problem: policy.FLASH_FIRST)
    seen = []
    real = sdpa.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(user_setting)
    try:
        inputs = make_inputs(Case(), "cpu")
        out = pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="torch")
        assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled() == user_setting
        assert_matches_reference(out, inputs)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)
