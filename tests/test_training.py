"""Training through the op: autograd of each backend, custom-op checks, torch.compile.

The kernels' gradients themselves are checked case by case in
tests/test_backward_contract.py; here the pieces around them are: the autograd
registration (residual gradient, default chunking), opcheck of the custom ops,
torch.compile of a training step, and a tiny model that trains the same on every backend.
"""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import autograd
from tests.attention_cases import Case, make_inputs
from tests.conftest import HAS_GPU, KERNEL_DEVICE
from tests.test_backward_contract import DIFFERENTIABLE, assert_gradients_match

needs_extension = pytest.mark.skipif(not pk.build_info()["built"], reason="perceiver_kernels._C is not built (no nvcc)")


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
    q, k, v = (inputs[name].detach().requires_grad_() for name in "qkv")
    # With gradients wanted the kernel backends pass no residual (they add it outside).
    args = ("triton", q, k, v, inputs["key_padding_mask"], None, 0.25, False, False)
    torch.library.opcheck(autograd.forward_op, args)
    out, lse = autograd.forward_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    backward_args = ("triton", torch.randn_like(out), q.detach(), k.detach(), v.detach(), inputs["key_padding_mask"],
                     out, lse, 0.25, False, False)
    torch.library.opcheck(autograd.backward_op, backward_args)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU interpreter path")
def test_the_forward_op_refuses_to_differentiate_a_fused_residual():
    inputs = make_inputs(Case(num_queries=5, num_keys=40, head_dim_v=24, residual=True), "cpu")
    q = inputs["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="without a residual when gradients are wanted"):
        autograd.forward_op("triton", q, inputs["k"], inputs["v"], None, inputs["residual"], 0.25, False, False)


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


@pytest.mark.gpu
@needs_extension
def test_explicit_cuda_backend_trains_through_the_triton_backward():
    case = Case(num_queries=100, num_keys=700, head_dim_qk=32, head_dim_v=96, dtype=torch.bfloat16, mask=True,
                residual=True)
    inputs = make_inputs(case, "cuda")
    leaves = {name: inputs[name].detach().requires_grad_() for name in ("q", "k", "v", "residual")}
    out = pk.cross_attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=leaves["residual"], backend="cuda")
    dout = torch.randn_like(out)
    out.backward(dout)
    assert_gradients_match({name: leaves[name].grad for name in "qkv"}, inputs, dout)
    torch.testing.assert_close(leaves["residual"].grad, dout, rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("num_queries,num_keys", [(100, 700), (300, 129)])
def test_explicit_cuda_backend_trains_causal_through_the_triton_backward(num_queries, num_keys):
    """The causal CUDA forward's lse feeds the causal Triton backward (with more queries
    than keys, the first rows see no key: zero gradients)."""
    case = Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=32, head_dim_v=96, dtype=torch.bfloat16,
                mask=True, residual=True)
    inputs = make_inputs(case, "cuda")
    inputs["causal"] = True
    leaves = {name: inputs[name].detach().requires_grad_() for name in ("q", "k", "v", "residual")}
    out = pk.cross_attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=leaves["residual"], causal=True, backend="cuda")
    dout = torch.randn_like(out)
    out.backward(dout)
    assert_gradients_match({name: leaves[name].grad for name in "qkv"}, inputs, dout)
    assert not leaves["q"].grad[:, :, :max(0, num_queries - num_keys)].any()
    torch.testing.assert_close(leaves["residual"].grad, dout, rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
def test_cuda_custom_op_passes_opcheck():
    inputs = make_inputs(Case(num_queries=70, num_keys=300, dtype=torch.float16, mask=True, residual=True), "cuda")
    args = ("cuda", inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"], 0.25,
            False, False)
    torch.library.opcheck(torch.ops.perceiver_kernels.forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
