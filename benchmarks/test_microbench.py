"""pytest-benchmark microbenchmarks of cross_attention at CPU-friendly sizes (GPU sizes on a GPU).

Not part of the default test run (pytest's testpaths is tests/). Save and compare runs:
    python -m pytest benchmarks/test_microbench.py --benchmark-autosave
    python -m pytest benchmarks/test_microbench.py --benchmark-compare
"""

import pytest
import torch

import perceiver_kernels as pk

from .op_suite import Shape, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SCALE = 8 if DEVICE.type == "cuda" else 1
SHAPES = [
    Shape("encode", 1, 4, 64, 8192 * SCALE, 64),
    Shape("encode-masked", 1, 4, 64, 8192 * SCALE, 64, pad_fraction=0.25),
    Shape("decode", 1, 4, 8192 * SCALE, 64, 64),
]


def _synchronized(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_forward(benchmark, shape):
    x = make_inputs(shape, DEVICE, DTYPE)
    benchmark(_synchronized(lambda: pk.cross_attention(x["q"], x["k"], x["v"], key_padding_mask=x["mask"])))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_forward_backward(benchmark, shape):
    x = make_inputs(shape, DEVICE, DTYPE)
    q, k, v = (x[name].requires_grad_() for name in ("q", "k", "v"))
    dout = torch.randn_like(pk.cross_attention(q, k, v, key_padding_mask=x["mask"]))

    def step():
        return torch.autograd.grad(pk.cross_attention(q, k, v, key_padding_mask=x["mask"]), (q, k, v), dout)

    benchmark(_synchronized(step))
