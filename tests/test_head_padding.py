"""The model layer stores wide heads padded to a multiple of 16 (perceiver/padding.py).

Every check compares a padded model against the same model built unpadded (the padding
rule replaced by the identity) holding the same weights: logits at the released
models' head dims (261, 322) at small sizes, HF's logits, state dicts in the true shapes
both ways, gradients of the true parameters, zero gradients of the padding and padding
that stays zero through training steps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import perceiver
from perceiver import CrossAttention, MultiHeadAttention, PerceiverAR
from perceiver import attention as attention_module
from perceiver.padding import HeadPaddedLinear, stored_head_dims

transformers = pytest.importorskip("transformers")
from tests.test_hf_configs import assert_same_logits, build, inputs_for  # noqa: E402


@pytest.fixture
def unpadded(monkeypatch):
    """Builds models inside `with unpadded():` with every head stored as it is."""

    @contextlib.contextmanager
    def context():
        with monkeypatch.context() as patch:
            patch.setattr(attention_module, "stored_head_dims", lambda head_dim_qk, head_dim_v: (head_dim_qk,
                                                                                                 head_dim_v))
            yield

    return context


def padded_layers(model: nn.Module) -> dict[str, HeadPaddedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, HeadPaddedLinear)}


def padding_of(layer: HeadPaddedLinear, name: str) -> torch.Tensor:
    """The stored entries of a layer's weight or bias (or their gradients) that are padding."""
    tensor = getattr(layer, name)
    kept = torch.zeros(tensor.shape, dtype=torch.bool)
    stripped = layer._strip(name, torch.arange(tensor.numel()).view(tensor.shape))
    kept.view(-1)[stripped.flatten()] = True
    return ~kept


def assert_padding_zero(model: nn.Module, gradients: bool = False) -> None:
    for name, layer in padded_layers(model).items():
        for parameter_name in ("weight", "bias"):
            parameter = getattr(layer, parameter_name)
            if parameter is None:
                continue
            value = parameter.grad if gradients else parameter
            assert value is not None, f"{name}.{parameter_name} has no gradient"
            padding = value[padding_of(layer, parameter_name)]
            assert padding.numel() or parameter_name == "bias", f"{name} pads nothing"
            assert torch.equal(padding, torch.zeros_like(padding)), f"{name}.{parameter_name}"


def test_only_wide_heads_off_the_16_channel_grid_are_padded():
    assert stored_head_dims(261, 261) == (272, 272)
    assert stored_head_dims(322, 322) == (336, 336)
    assert stored_head_dims(1280, 24) == (1280, 32)  # the Dv of a wide head pads too
    assert stored_head_dims(300, 100) == (304, 112)
    for dims in ((512, 512), (32, 1280), (64, 64), (40, 24), (100, 7), (256, 200)):
        assert stored_head_dims(*dims) == dims
    assert not padded_layers(CrossAttention(32, heads=2, dim_head=40, value_dim_head=24))
    assert not padded_layers(MultiHeadAttention(32, qk_channels=512, v_channels=512))


# The released models' wide heads at small sizes: the Fourier classifier's 261-channel
# encoder head, the conv classifier's and optical flow's 322.
RELEASED_WIDE = {"fourier": 272, "conv": 336, "flow": 336}


@pytest.mark.parametrize("kind", list(RELEASED_WIDE))
def test_converted_released_models_pad_and_return_the_logits_of_hf_and_of_the_unpadded_model(kind, unpadded):
    hf_model = build(kind)
    padded = perceiver.from_hf(hf_model).eval()
    with unpadded():
        plain = perceiver.from_hf(hf_model).eval()
    layers = padded_layers(padded)
    assert set(layers) == {f"encoder.cross_attention.attention.{name}" for name in ("query", "key", "value", "output")}
    stored = RELEASED_WIDE[kind]
    assert layers["encoder.cross_attention.attention.key"].out_features == stored
    assert layers["encoder.cross_attention.attention.output"].in_features == stored
    assert not padded_layers(plain)
    assert_padding_zero(padded)
    inputs = inputs_for(kind, hf_model.config)
    with torch.no_grad():
        got, unpadded_logits = padded(inputs), plain(inputs)
        assert_same_logits(got, hf_model(inputs=inputs).logits)
    torch.testing.assert_close(got, unpadded_logits, rtol=1e-6, atol=1e-6 * unpadded_logits.abs().max().item())


@pytest.mark.parametrize("kind", list(RELEASED_WIDE))
def test_state_dicts_keep_the_true_shapes_both_ways(kind, unpadded):
    hf_model = build(kind)
    padded = perceiver.from_hf(hf_model).eval()
    with unpadded():
        plain = perceiver.from_hf(hf_model).eval()
    saved = padded.state_dict()
    expected = plain.state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    for key in expected:
        assert torch.equal(saved[key], expected[key]), key

    # Into a fresh padded model from the plain one's checkpoint, and back into a plain one.
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    padded.load_state_dict(plain.state_dict())
    assert_padding_zero(padded)
    inputs = inputs_for(kind, hf_model.config)
    with torch.no_grad():
        expected_logits = plain(inputs)
        torch.testing.assert_close(padded(inputs), expected_logits, rtol=1e-6,
                                   atol=1e-6 * expected_logits.abs().max().item())
    with unpadded():
        reloaded = perceiver.from_hf(hf_model).eval()
    reloaded.load_state_dict(padded.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_cross_attention_with_a_wide_head_is_still_a_drop_in_for_perceiver_pytorch():
    from perceiver_pytorch.perceiver_io import Attention as LucidrainsAttention

    torch.manual_seed(0)
    theirs = LucidrainsAttention(32, 24, heads=2, dim_head=261)
    ours = CrossAttention(32, 24, heads=2, dim_head=261)
    assert ours.stored_head_dims == (272, 272) and set(padded_layers(ours)) == {"to_q", "to_kv", "to_out"}
    ours.load_state_dict(theirs.state_dict())
    assert_padding_zero(ours)
    x, context = torch.randn(2, 9, 32), torch.randn(2, 17, 24)
    mask = torch.rand(2, 17) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(ours(x, context, mask=mask), theirs(x, context, mask=mask))
    with torch.no_grad():
        ours.to_q.weight.mul_(1.5)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs(x, context), ours(x, context))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_a_fresh_padded_layer_draws_the_weights_of_an_unpadded_one(unpadded):
    torch.manual_seed(3)
    padded = MultiHeadAttention(40, 24, qk_channels=2 * 261, v_channels=2 * 300, num_heads=2, output_channels=40)
    with unpadded():
        torch.manual_seed(3)
        plain = MultiHeadAttention(40, 24, qk_channels=2 * 261, v_channels=2 * 300, num_heads=2, output_channels=40)
    for key, value in plain.state_dict().items():
        assert torch.equal(padded.state_dict()[key], value), key
    assert_padding_zero(padded)
    padded.output.reset_parameters()
    assert_padding_zero(padded)


def test_checkpoints_of_another_shape_are_refused_in_the_true_shapes():
    attention = MultiHeadAttention(40, qk_channels=261, v_channels=261)
    state = attention.state_dict()
    state["key.weight"] = torch.zeros(260, 40)
    with pytest.raises(RuntimeError, match=r"key\.weight: copying a param with shape \(260, 40\) from checkpoint, "
                                           r"the shape in current model is \(261, 40\)"):
        attention.load_state_dict(state)


def _train(model: nn.Module, inputs, steps: int = 3) -> list[torch.Tensor]:
    """A few AdamW steps with weight decay on a loss over the logits; the loss of each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(inputs).square().mean()
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
    return losses


@pytest.mark.parametrize("kind", ["fourier", "conv"])
def test_gradients_of_the_true_parameters_are_unchanged_and_the_padding_stays_zero(kind, unpadded):
    hf_model = build(kind)
    padded = perceiver.from_hf(hf_model).train()
    with unpadded():
        plain = perceiver.from_hf(hf_model).train()
    inputs = inputs_for(kind, hf_model.config)
    for model in (padded, plain):
        model.zero_grad()
        model(inputs).square().mean().backward()
    assert_padding_zero(padded, gradients=True)
    plain_gradients = dict(plain.named_parameters())
    for name, parameter in padded.named_parameters():
        expected = plain_gradients[name].grad
        layer_name, _, parameter_name = name.rpartition(".")
        layer = padded.get_submodule(layer_name)
        got = layer._strip(parameter_name, parameter.grad) if isinstance(layer, HeadPaddedLinear) else parameter.grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=name)

    padded_losses, plain_losses = _train(padded, inputs), _train(plain, inputs)
    torch.testing.assert_close(torch.stack(padded_losses), torch.stack(plain_losses), rtol=1e-5, atol=0)
    assert_padding_zero(padded)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(padded.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_perceiver_ar_turns_only_the_true_channels_of_a_padded_head(unpadded):
    torch.manual_seed(0)
    config = dict(vocab_size=11, max_seq_len=24, num_latents=8, dim=2 * 262, num_heads=2, num_layers=1)
    padded = PerceiverAR(**config).eval()
    with unpadded():
        plain = PerceiverAR(**config).eval()
    plain.load_state_dict(padded.state_dict())
    assert padded_layers(padded) and not padded_layers(plain)
    tokens = torch.randint(0, 11, (2, 20))
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, :5] = True
    with torch.no_grad():
        expected = plain(tokens, key_padding_mask=padding)
        torch.testing.assert_close(padded(tokens, key_padding_mask=padding), expected, rtol=1e-5, atol=1e-5)
        generated = padded.generate(tokens[:, :10], 4, temperature=0)
        torch.testing.assert_close(generated, plain.generate(tokens[:, :10], 4, temperature=0))


@pytest.mark.parametrize("kind", ["fourier", "conv"])
def test_converted_models_run_their_padded_heads_on_the_untimed_wide_forward(kind, monkeypatch):
    """On the Triton kernels with the untimed switch, the padded cross-attention heads run
    the wide forward that computes each score once: in float32 (exact dots, through
    pointers) with HF's logits, in float16 through TMA descriptors (rows of 272 and 336
    channels are 16-byte aligned) with HF's logits to float16 accuracy."""
    from perceiver_kernels.triton import variants, wide

    launched = []
    real_launch = wide._launch
    monkeypatch.setattr(wide, "_launch", lambda plan, call: launched.append(call.problem) or real_launch(plan, call))
    real_descriptors = wide._descriptors
    described = []
    monkeypatch.setattr(wide, "_descriptors",
                        lambda *args: described.append(args[0].shape) or real_descriptors(*args))
    hf_model = build(kind)
    ours = perceiver.use_backend(perceiver.from_hf(hf_model).eval(), "triton")
    inputs = inputs_for(kind, hf_model.config)
    with torch.no_grad(), variants.running(variants.UNTIMED):
        expected = hf_model(inputs=inputs).logits
        assert_same_logits(ours(inputs), expected)
        assert not described
        half = ours.half()(inputs.half()).float()
    torch.testing.assert_close(half, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    assert [problem.head_dim_qk for problem in launched] == [RELEASED_WIDE[kind]] * 2
    assert described and all(shape[-1] == RELEASED_WIDE[kind] for shape in described)
