"""Every bad input raises ValueError / TypeError naming the argument."""

import pytest
import torch

import perceiver_kernels as pk


def good():
    return dict(q=torch.randn(2, 3, 5, 8), k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 6))


def call(**overrides):
    args = {**good(), **overrides}
    return pk.cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(q=torch.randn(2, 5, 8)), ValueError, ["q", "4 dimensions", "(B, H, Nq, Dqk)"]),
        (dict(k=torch.randn(2, 3, 7, 8, 1)), ValueError, ["k", "4 dimensions"]),
        (dict(v=[1.0]), TypeError, ["v", "torch.Tensor"]),
        (dict(k=torch.randn(1, 3, 7, 8)), ValueError, ["k", "B=2"]),
        (dict(k=torch.randn(2, 4, 7, 8)), ValueError, ["k", "H=3"]),
        (dict(k=torch.randn(2, 3, 7, 9)), ValueError, ["k", "Dqk=8"]),
        (dict(v=torch.randn(2, 3, 6, 6)), ValueError, ["v", "Nk=7"]),
        (dict(v=torch.randn(2, 2, 7, 6)), ValueError, ["v", "H=3"]),
        (dict(q=torch.randn(2, 3, 5, 0), k=torch.randn(2, 3, 7, 0)), ValueError, ["head dims", "Dqk=0"]),
        (dict(q=torch.ones(2, 3, 5, 8, dtype=torch.int32)), TypeError, ["q", "floating-point"]),
        (dict(q=torch.randn(2, 3, 5, 8, dtype=torch.complex64)), TypeError, ["q", "floating-point"]),
        (dict(q=torch.randn(2, 3, 5, 8).to(torch.float8_e4m3fn)), TypeError, ["q", "unsupported dtype"]),
        (dict(k=torch.randn(2, 3, 7, 8, dtype=torch.float16)), TypeError, ["k", "dtype of q"]),
        (dict(v=torch.randn(2, 3, 7, 6, dtype=torch.bfloat16)), TypeError, ["v", "dtype of q"]),
        (dict(k=torch.randn(2, 3, 7, 8, device="meta")), ValueError, ["k", "device of q"]),
        (dict(key_padding_mask=torch.zeros(2, 7)), TypeError, ["key_padding_mask", "torch.bool"]),
        (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, ["key_padding_mask", "(B=2, Nk=7)"]),
        (dict(key_padding_mask=torch.zeros(2, 1, 1, 7, dtype=torch.bool)), ValueError, ["key_padding_mask", "shape"]),
        (dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device="meta")), ValueError, ["key_padding_mask", "device"]),
        (dict(key_padding_mask=[[True] * 7] * 2), TypeError, ["key_padding_mask"]),
        (dict(residual=torch.randn(2, 3, 5, 8)), ValueError, ["residual", "(2, 3, 5, 6)"]),
        (dict(residual=torch.randn(2, 3, 5, 6, dtype=torch.float64)), TypeError, ["residual", "dtype"]),
        (dict(residual=torch.randn(2, 3, 5, 6, device="meta")), ValueError, ["residual", "device"]),
        (dict(residual=1.0), TypeError, ["residual"]),
        (dict(scale=torch.tensor(0.5)), TypeError, ["scale", "float"]),
        (dict(scale=float("nan")), ValueError, ["scale", "finite"]),
        (dict(scale=1e39), ValueError, ["scale", "|scale| <= 65536"]),
        (dict(scale=-1e38), ValueError, ["scale", "|scale| <= 65536"]),
        (dict(scale=True), TypeError, ["scale"]),
        (dict(backend="flash"), ValueError, ["backend", "'auto'", "'triton'", "'cuda'", "'torch'"]),
        (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
        (dict(dropout_p=-0.1), ValueError, ["dropout_p"]),
        (dict(dropout_p="0.1"), TypeError, ["dropout_p", "float"]),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error) as raised:
        call(**overrides)
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_explain_validates_too():
    with pytest.raises(ValueError, match="key_padding_mask"):
        pk.explain(**good(), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))


def test_integer_scale_is_accepted():
    args = good()
    torch.testing.assert_close(pk.cross_attention(**args, scale=1), pk.reference_attention(**args, scale=1.0))


@pytest.mark.parametrize("scale", [65536.0, -65536.0, 0.0, 1e-30])
def test_scales_in_the_accepted_range_give_the_reference(scale):
    args = good()
    torch.testing.assert_close(pk.cross_attention(**args, scale=scale),
                               pk.reference_attention(**args, scale=scale, upcast=True).float())
