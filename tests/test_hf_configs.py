"""perceiver.from_hf over a grid of HF configurations, for each of the six converted model classes.

Small random PerceiverConfigs (no downloads, no pretrained weights): qk / v channels,
heads, d_model vs d_latents, widening factors, the encoder's query residual, the
cross-attention shape, block structure, the MLP activation. Each variant runs on every class; the
converted model must return HF's logits. Configurations that HF builds but cannot run
are refused with a ValueError that says why, and objects that are not a converted HF
task model with a TypeError naming the supported classes.
"""

import pytest
import torch
from torch import nn

import perceiver
from perceiver.interop import multimodal_decode
from tests.test_adapters import randomize

transformers = pytest.importorskip("transformers")
from transformers import PerceiverConfig  # noqa: E402

BASE = dict(num_latents=4, d_latents=16, num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=2,
            num_cross_attention_heads=1)
MULTIMODAL = dict(num_frames=2, audio_samples_per_frame=8, samples_per_patch=4, image_size=4,
                  output_shape=[1, 2, 4, 4], output_num_channels=8, num_labels=3, _label_trainable_num_channels=8)

# Per class: the HF model class, its config (d_model is the preprocessor's width where the
# class fixes one) and its inputs. The multimodal d_model is read from a probe model.
MODELS = {
    "masked_lm": (transformers.PerceiverForMaskedLM, dict(vocab_size=20, max_position_embeddings=10, d_model=40)),
    "learned": (transformers.PerceiverForImageClassificationLearned, dict(image_size=4, d_model=512, num_labels=3)),
    "fourier": (transformers.PerceiverForImageClassificationFourier, dict(image_size=4, d_model=261, num_labels=3)),
    "conv": (transformers.PerceiverForImageClassificationConvProcessing, dict(image_size=16, d_model=322,
                                                                              num_labels=3)),
    "flow": (transformers.PerceiverForOpticalFlow, dict(train_size=[4, 6], d_model=322)),
    "multimodal": (transformers.PerceiverForMultimodalAutoencoding, MULTIMODAL),
}

# Each variant keeps self-attention v_channels = d_latents, the configurations HF can run.
VARIANTS = {
    "defaults": {},
    "qk-narrow-more-heads": dict(qk_channels=8, v_channels=16, num_self_attention_heads=4, num_cross_attention_heads=2),
    "qk-wide-widening-relu": dict(qk_channels=32, v_channels=16, cross_attention_widening_factor=3,
                                  self_attention_widening_factor=2, hidden_act="relu"),
    "qk-equals-latents": dict(qk_channels=16),
    "shape-q-no-query-residual": dict(cross_attention_shape_for_attention="q", num_cross_attention_heads=4,
                                      use_query_residual=False),
    "wider-latents-shared-blocks-gelu-tanh": dict(d_latents=24, qk_channels=12, v_channels=24,
                                                  num_self_attention_heads=3, num_blocks=2,
                                                  num_self_attends_per_block=2, hidden_act="gelu_new"),
    "no-self-attention": dict(num_self_attends_per_block=0),
}


def build(kind, **overrides):
    model_class, config = MODELS[kind]
    config = {**BASE, **config, **overrides}
    if kind == "multimodal":
        # The encoder's kv width must match the multimodal preprocessor's, which depends on the config.
        config["d_model"] = model_class(PerceiverConfig(**config)).perceiver.input_preprocessor.num_channels
    model = randomize(model_class(PerceiverConfig(**config)))
    # Every weight and bias random (HF initialises biases to 0), at a scale that keeps the
    # softmaxes from saturating, so that every parameter shows in the logits.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    return model.eval()


def assert_same_logits(got, expected, msg=None):
    """Equal up to fp32 rounding, relative to the largest logit (flow logits are divided by 100)."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5 * expected.abs().max().item(), msg=msg)


def inputs_for(kind, config):
    torch.manual_seed(1)
    if kind == "masked_lm":
        return torch.randint(0, config.vocab_size, (2, config.max_position_embeddings))
    if kind == "flow":
        return torch.randn(1, 2, 27, *config.train_size)
    if kind == "multimodal":
        return {
            "audio": torch.randn(2, config.num_frames * config.audio_samples_per_frame, 1),
            "image": torch.randn(2, config.num_frames, 3, config.image_size, config.image_size),
            "label": nn.functional.one_hot(torch.tensor([0, 2]), config.num_labels).float(),
        }
    return torch.randn(2, 3, config.image_size, config.image_size)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", MODELS)
def test_converted_model_returns_the_hf_logits(kind, variant):
    hf_model = build(kind, **VARIANTS[variant])
    ours = perceiver.from_hf(hf_model).eval()
    inputs = inputs_for(kind, hf_model.config)
    with torch.no_grad():
        if kind != "multimodal":
            assert_same_logits(ours(inputs), hf_model(inputs=inputs).logits)
            return
        points = {"audio": torch.tensor([3, 0]), "image": torch.arange(0, 32, 5), "label": None}
        expected = hf_model(inputs=inputs, subsampled_output_points=points).logits
        got = multimodal_decode(ours, inputs, points)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_same_logits(got[name], expected[name], msg=name)


@pytest.mark.parametrize("d_model", [16, 40])
def test_masked_lm_with_d_model_equal_to_and_other_than_d_latents(d_model):
    hf_model = build("masked_lm", d_model=d_model, qk_channels=8, v_channels=16, num_self_attention_heads=4)
    ours = perceiver.from_hf(hf_model).eval()
    tokens = inputs_for("masked_lm", hf_model.config)
    with torch.no_grad():
        assert_same_logits(ours(tokens), hf_model(inputs=tokens).logits)


@pytest.mark.parametrize("config,v_channels", [
    (dict(d_model=128, d_latents=256, qk_channels=64, v_channels=128), 128),  # the configurations of issue 12
    (dict(d_model=128, d_latents=256, qk_channels=64), 64),  # v_channels defaults to qk_channels
    (dict(d_model=16, d_latents=16, v_channels=8), 8),
], ids=["qk64-v128", "qk64", "v-narrow"])
def test_configurations_hf_cannot_run_are_refused_with_the_reason(config, v_channels):
    hf_model = build("masked_lm", **config)
    tokens = inputs_for("masked_lm", hf_model.config)
    with pytest.raises(RuntimeError, match="size of tensor"):
        hf_model(inputs=tokens)  # HF builds the model but fails at its first forward
    with pytest.raises(ValueError, match=rf"cannot run.*v_channels={v_channels} .*d_latents={config['d_latents']}"):
        perceiver.from_hf(hf_model)


@pytest.mark.parametrize("obj", [None, nn.Linear(2, 3), "PerceiverModel"], ids=["None", "Linear", "PerceiverModel"])
def test_unsupported_objects_get_a_type_error_naming_the_supported_models(obj):
    if obj == "PerceiverModel":
        obj = transformers.PerceiverModel(PerceiverConfig(**BASE, d_model=16))
    with pytest.raises(TypeError, match=rf"PerceiverForMaskedLM.*PerceiverForMultimodalAutoencoding.*"
                                        rf"got {type(obj).__name__}"):
        perceiver.from_hf(obj)


@pytest.mark.parametrize("hidden_act", ["prelu", "quick_gelu"])
def test_activations_without_a_torch_equivalent_are_refused(hidden_act):
    with pytest.raises(NotImplementedError, match=rf"hidden_act='{hidden_act}' is not converted; supported: .*'relu'"):
        perceiver.from_hf(build("masked_lm", hidden_act=hidden_act))
