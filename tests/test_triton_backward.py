"""The Triton backward against autograd of the float64 reference, and training through the op.

Same case grid as the forward (tests/test_triton_forward.py). "chunks" forces how
the summed dimension of each backward kernel is cut: 1 (gradients written in place)
or 3 (fp32 partials reduced afterwards).
"""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import ops
from perceiver_kernels.triton_launch import attention_backward, attention_forward
from tests.attention_cases import EPSILON, Case, make_inputs, max_error
from tests.conftest import HAS_GPU, KERNEL_DEVICE
from tests.test_triton_forward import GRID

DIFFERENTIABLE = ("q", "k", "v", "residual")


def reference_gradients(inputs, dout, upcast):
    dtype = torch.float64 if upcast else inputs["q"].dtype
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in DIFFERENTIABLE if inputs[name] is not None}
    out = pk.reference_attention(**{**inputs, **leaves})
    return dict(zip(leaves, torch.autograd.grad(out, tuple(leaves.values()), dout.to(dtype))))


def assert_gradients_match(grads: dict, inputs: dict, dout: torch.Tensor) -> None:
    """DESIGN.md's rule, with the epsilon scaled by the largest true gradient of the call.

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
        bound = 2 * plain_error + EPSILON[grad.dtype] * magnitude
        assert error <= bound, f"d{name}: max error {error:.3g} > 2 x plain PyTorch {plain_error:.3g} + eps"


def run_backward(inputs, dout, num_chunks, fuse_residual=False):
    """Kernel gradients; like the triton backend in training, the residual is not fused by default."""
    scale = inputs["scale"] if inputs["scale"] is not None else inputs["q"].shape[-1] ** -0.5
    residual = inputs["residual"] if fuse_residual else None
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], residual)
    out, lse = attention_forward(*args, scale, False)
    return dict(zip("qkv", attention_backward(dout, *args, out, lse, scale, False, num_chunks=num_chunks)))


@pytest.mark.parametrize("num_chunks", [1, 3])
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"q{c.num_queries}-k{c.num_keys}-d{c.head_dim_qk}x{c.head_dim_v}-{str(c.dtype)[6:]}")
def test_grid_gradients(case, num_chunks, poisoned_empty):
    inputs = make_inputs(case, KERNEL_DEVICE)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(run_backward(inputs, dout, num_chunks), inputs, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_through_autograd_with_residual_and_default_chunking(dtype, poisoned_empty):
    case = Case(batch=2, heads=3, num_queries=40, num_keys=1500, head_dim_qk=32, head_dim_v=48, dtype=dtype,
                mask=True, residual=True, transposed=True)
    inputs = make_inputs(case, KERNEL_DEVICE)
    leaves = {name: inputs[name].detach().requires_grad_() for name in DIFFERENTIABLE}
    out = pk.cross_attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=leaves["residual"], backend="triton")
    dout = torch.randn_like(out)
    grads = dict(zip(leaves, torch.autograd.grad(out, tuple(leaves.values()), dout)))
    assert_gradients_match(grads, inputs, dout)
    torch.testing.assert_close(grads["residual"], dout, rtol=0, atol=0)


def test_backward_of_a_fused_residual_is_correct_to_the_output_rounding():
    # Direct callers of the op may fuse the residual and train; the backward then
    # recovers the attention output as out - residual.
    case = Case(num_queries=30, num_keys=200, head_dim_qk=32, head_dim_v=24, mask=True, residual=True)
    inputs = make_inputs(case, KERNEL_DEVICE)
    dout = torch.randn_like(inputs["residual"])
    assert_gradients_match(run_backward(inputs, dout, 3, fuse_residual=True), inputs, dout)


def test_padding_keys_and_rows_without_keys_get_exactly_zero_gradients():
    inputs = make_inputs(Case(num_queries=9, num_keys=300, head_dim_v=24, mask=True, residual=True), KERNEL_DEVICE)
    dout = torch.randn_like(inputs["residual"])
    for num_chunks in (1, 3):
        grads = run_backward(inputs, dout, num_chunks)
        padding = inputs["key_padding_mask"]
        assert torch.count_nonzero(grads["q"][0]) == 0  # batch 0: every key is padding
        assert torch.count_nonzero(grads["k"][0]) == 0 and torch.count_nonzero(grads["v"][0]) == 0
        assert torch.count_nonzero(grads["k"][1][:, padding[1]]) == 0
        assert torch.count_nonzero(grads["v"][1][:, padding[1]]) == 0
        assert torch.count_nonzero(grads["k"][1][:, ~padding[1]]) > 0


def test_gradcheck_of_the_torch_backend_in_float64():
    inputs = make_inputs(Case(batch=2, heads=1, num_queries=3, num_keys=6, head_dim_qk=4, head_dim_v=5,
                              dtype=torch.float64, mask=True, residual=True), "cpu")
    inputs["key_padding_mask"][1, :2] = True

    def op(q, k, v, residual):
        return pk.cross_attention(q, k, v, key_padding_mask=inputs["key_padding_mask"], residual=residual,
                                  backend="torch")

    leaves = tuple(inputs[name].detach().requires_grad_() for name in DIFFERENTIABLE)
    assert torch.autograd.gradcheck(op, leaves)
    assert torch.autograd.gradgradcheck(op, leaves)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU interpreter path; the GPU runs it with compiled kernels")
def test_custom_ops_pass_opcheck_with_gradients():
    inputs = make_inputs(Case(num_queries=5, num_keys=40, head_dim_v=24, mask=True, residual=True), "cpu")
    leaves = [inputs[name].detach().requires_grad_() for name in DIFFERENTIABLE]
    args = (*leaves[:3], inputs["key_padding_mask"], leaves[3], 0.25, False)
    torch.library.opcheck(ops.triton_forward, args)
    out, lse = ops.triton_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    backward_args = (torch.randn_like(out), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5]],
                     out, lse, 0.25, False)
    torch.library.opcheck(ops.triton_backward, backward_args)


def test_torch_compile_fullgraph_forward_and_backward():
    inputs = make_inputs(Case(num_queries=5, num_keys=40, head_dim_v=24, mask=True, residual=True), KERNEL_DEVICE)

    def loss(q, k, v, residual):
        out = pk.cross_attention(q, k, v, key_padding_mask=inputs["key_padding_mask"], residual=residual,
                                 backend="triton")
        return (out.float() ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, loss):
        leaves = [inputs[name].detach().requires_grad_() for name in DIFFERENTIABLE]
        value = fn(*leaves)
        value.backward()
        results.append((value.detach(), [leaf.grad for leaf in leaves]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for compiled_grad, eager_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_a_tiny_model_trains_the_same_through_each_backend():
    """Cross-attention encoder + linear head, a few SGD steps: the losses agree."""

    def train(backend):
        torch.manual_seed(0)
        latents = torch.nn.Parameter(torch.randn(16, 32))
        to_q, to_kv = torch.nn.Linear(32, 32), torch.nn.Linear(8, 64)
        head = torch.nn.Linear(32, 1)
        params = [latents, *to_q.parameters(), *to_kv.parameters(), *head.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.05)
        data = torch.randn(4, 300, 8)
        mask = torch.zeros(4, 300, dtype=torch.bool)
        mask[1, 200:] = True
        target = data[..., 0].mean(-1, keepdim=True)
        losses = []
        for _ in range(4):
            q = to_q(latents).view(1, 16, 2, 16).transpose(1, 2).expand(4, -1, -1, -1)
            k, v = to_kv(data).view(4, 300, 2, 2, 16).unbind(2)
            out = pk.cross_attention(q, k.transpose(1, 2), v.transpose(1, 2), key_padding_mask=mask,
                                     backend=backend)
            prediction = head(out.transpose(1, 2).reshape(4, 16, 32).mean(1))
            loss = torch.nn.functional.mse_loss(prediction, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    reference = train("torch")
    assert reference[-1] < reference[0]
    if KERNEL_DEVICE == "cpu":
        torch.testing.assert_close(train("triton"), reference, rtol=1e-4, atol=1e-6)
