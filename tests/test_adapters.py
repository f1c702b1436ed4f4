"""Input/output adapters against the Hugging Face Perceiver pre- and postprocessors.

Every HF module comes from a small random PerceiverConfig (no downloads), mostly taken
from the HF model classes themselves, so that exactly what those models build is
tested. Weights are randomised (biases and batch-norm statistics included) before
conversion with from_hf, then both run on the same random inputs.
"""

import pytest
import torch
from torch import nn

from perceiver.adapters import (
    AudioInputAdapter,
    AudioOutputAdapter,
    ClassificationOutputAdapter,
    EmbeddingDecoderOutputAdapter,
    FlowOutputAdapter,
    GridFourierEncoding,
    ImageInputAdapter,
    MultimodalInputAdapter,
    MultimodalOutputAdapter,
    OneHotInputAdapter,
    ProjectionOutputAdapter,
    TokenInputAdapter,
    input_adapter_from_hf,
    output_adapter_from_hf,
)
from perceiver.position import TrainablePositionEncoding

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")

NUM_LABELS = 5
CONFIG = dict(
    num_latents=4, d_latents=16, d_model=16, num_self_attends_per_block=1, num_self_attention_heads=2,
    num_cross_attention_heads=1, vocab_size=30, max_position_embeddings=12, image_size=8, train_size=(6, 8),
    num_frames=2, audio_samples_per_frame=16, samples_per_patch=4, output_shape=(1, 2, 8, 8), output_num_channels=8,
    num_labels=NUM_LABELS, _label_trainable_num_channels=8,
)


def randomize(module: nn.Module) -> nn.Module:
    """Random values for every parameter and float buffer; batch-norm variances stay positive."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor))
    return module


@pytest.fixture(scope="module")
def config():
    return transformers.PerceiverConfig(**CONFIG)


@pytest.fixture(scope="module")
def models(config):
    classes = {
        "masked_lm": hf.PerceiverForMaskedLM,
        "learned": hf.PerceiverForImageClassificationLearned,
        "fourier": hf.PerceiverForImageClassificationFourier,
        "conv": hf.PerceiverForImageClassificationConvProcessing,
        "flow": hf.PerceiverForOpticalFlow,
        "multimodal": hf.PerceiverForMultimodalAutoencoding,
    }
    return {name: randomize(cls(config)).eval() for name, cls in classes.items()}


def multimodal_inputs(batch=2):
    frames, samples = CONFIG["num_frames"], CONFIG["num_frames"] * CONFIG["audio_samples_per_frame"]
    return {
        "audio": torch.randn(batch, samples, 1),
        "image": torch.randn(batch, frames, 3, CONFIG["image_size"], CONFIG["image_size"]),
        "label": torch.nn.functional.one_hot(torch.arange(batch) % NUM_LABELS, NUM_LABELS).float(),
    }


# Input adapters against HF.

@pytest.mark.parametrize("length", [12, 7])
def test_token_input_matches_hf(models, length):
    pre = models["masked_lm"].perceiver.input_preprocessor
    ours = TokenInputAdapter.from_hf(pre)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, length))
    torch.testing.assert_close(ours(ids), pre(ids)[0])
    assert ours.num_channels == pre.num_channels


@pytest.mark.parametrize("model, shape", [
    ("learned", (2, 3, 8, 8)),       # conv1x1 + trainable positions projected to 256, concat
    ("fourier", (2, 3, 8, 8)),       # pixels + Fourier (max resolution 224)
    ("conv", (2, 3, 32, 32)),        # conv stem (32 -> 16 -> 7) + Fourier (max resolution 56)
    ("flow", (2, 2, 27, 6, 8)),      # two frames of 3x3 patches, patches + Linear + Fourier
])
def test_hf_image_model_preprocessors_match(models, model, shape):
    pre = models[model].perceiver.input_preprocessor
    ours = ImageInputAdapter.from_hf(pre)
    images = torch.randn(shape)
    torch.testing.assert_close(ours(images), pre(images)[0])
    assert ours.num_channels == pre.num_channels


def test_conv_stem_matches_hf_in_training_mode(models):
    pre = models["conv"].perceiver.input_preprocessor
    ours = ImageInputAdapter.from_hf(pre).train()
    pre.train()
    try:
        images = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(ours(images), pre(images)[0])
        torch.testing.assert_close(ours.featurizer[1].running_mean, pre.convnet.batchnorm.running_mean)
    finally:
        pre.eval()


@pytest.mark.parametrize("kwargs, shape", [
    (dict(prep_type="conv1x1", spatial_downsample=2, out_channels=6, position_encoding_type="trainable",
          concat_or_add_pos="add", trainable_position_encoding_kwargs=dict(index_dims=16, num_channels=6)),
     (2, 3, 8, 8)),
    (dict(prep_type="patches", spatial_downsample=2, temporal_downsample=1,
          fourier_position_encoding_kwargs=dict(num_bands=4, max_resolution=(3, 8, 8))),
     (2, 3, 3, 8, 8)),
    (dict(prep_type="patches", spatial_downsample=2, temporal_downsample=2, conv_after_patching=True,
          conv_after_patching_in_channels=24, out_channels=10,
          fourier_position_encoding_kwargs=dict(num_bands=3, max_resolution=(2, 4, 4), sine_only=True)),
     (2, 4, 3, 8, 8)),
    (dict(prep_type="patches", spatial_downsample=2,
          fourier_position_encoding_kwargs=dict(num_bands=5, max_resolution=(4, 4))),
     (2, 3, 8, 8)),
    (dict(prep_type="pixels", spatial_downsample=2, temporal_downsample=2,
          fourier_position_encoding_kwargs=dict(num_bands=4, max_resolution=(2, 4, 4))),
     (2, 4, 3, 7, 8)),
])
def test_image_preprocessor_variants_match_hf(config, kwargs, shape):
    pre = randomize(hf.PerceiverImagePreprocessor(config, **kwargs)).eval()
    ours = ImageInputAdapter.from_hf(pre)
    images = torch.randn(shape)
    expected = pre(images)[0]
    torch.testing.assert_close(ours(images), expected)
    assert ours.num_channels == expected.shape[-1]


def test_pixels_downsample_rows_and_columns():
    # HF's 4-D pixels path slices batch and channels instead, so this is checked directly.
    ours = ImageInputAdapter("pixels", GridFourierEncoding(2, (4, 4)), spatial_downsample=2)
    images = torch.randn(2, 3, 7, 8)
    out = ours(images)
    assert out.shape == (2, 16, ours.num_channels)
    torch.testing.assert_close(out[..., :3], images[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(2, 16, 3))


def test_audio_input_matches_hf(models):
    pre = models["multimodal"].perceiver.input_preprocessor.modalities["audio"]
    ours = AudioInputAdapter.from_hf(pre)
    for audio in (multimodal_inputs()["audio"], multimodal_inputs()["audio"][..., 0]):
        torch.testing.assert_close(ours(audio), pre(audio)[0])
    assert ours.num_channels == pre.num_channels


@pytest.mark.parametrize("kwargs", [
    dict(concat_or_add_pos="add", trainable_position_encoding_kwargs=dict(index_dims=8, num_channels=4)),
    dict(project_pos_dim=6, out_channels=10, trainable_position_encoding_kwargs=dict(index_dims=8, num_channels=10)),
])
def test_audio_trainable_variants_match_hf(config, kwargs):
    pre = randomize(hf.PerceiverAudioPreprocessor(config, samples_per_patch=4, position_encoding_type="trainable",
                                                  **kwargs)).eval()
    ours = AudioInputAdapter.from_hf(pre)
    audio = torch.randn(2, 32)
    torch.testing.assert_close(ours(audio), pre(audio)[0])
    assert ours.num_channels == pre.num_channels


def test_one_hot_input_matches_hf(models):
    pre = models["multimodal"].perceiver.input_preprocessor.modalities["label"]
    ours = OneHotInputAdapter.from_hf(pre)
    labels = multimodal_inputs()["label"]
    torch.testing.assert_close(ours(labels), pre(labels)[0])
    assert ours.num_channels == pre.num_channels


def test_multimodal_input_matches_hf(models):
    pre = models["multimodal"].perceiver.input_preprocessor
    ours = MultimodalInputAdapter.from_hf(pre)
    inputs = multimodal_inputs()
    expected, expected_sizes, _ = pre(inputs)
    out = ours(inputs)
    torch.testing.assert_close(out, expected)
    assert out.shape[1] == sum(expected_sizes.values())
    assert ours.num_channels == pre.num_channels
    # HF masks the label with probability 1: its input is the mask token.
    torch.testing.assert_close(out[:, -1], pre.mask["label"].expand(2, -1))


def test_multimodal_input_orders_modalities_by_name_as_hf(config):
    pre = randomize(hf.PerceiverMultimodalPreprocessor(
        {"text": hf.PerceiverTextPreprocessor(config), "label": hf.PerceiverOneHotPreprocessor(config)},
        min_padding_size=3)).eval()
    ours = MultimodalInputAdapter.from_hf(pre)
    inputs = {"text": torch.randint(0, CONFIG["vocab_size"], (2, 6)), "label": torch.randn(2, NUM_LABELS)}
    expected, expected_sizes, _ = pre(inputs)
    out = ours(inputs)
    torch.testing.assert_close(out, expected)  # label (1 position) before text (6): sorted names
    assert sorted(expected_sizes.items()) == [("label", 1), ("text", 6)]


def test_multimodal_partial_masking():
    torch.manual_seed(0)
    ours = MultimodalInputAdapter({"a": OneHotInputAdapter(3), "b": OneHotInputAdapter(4)}, mask_probs={"a": 0.5})
    labels = {"a": torch.randn(64, 3), "b": torch.randn(64, 4)}
    out = ours(labels)
    assert out.shape == (64, 2, 6)
    is_mask = (out[:, 0] == ours.mask_tokens["a"]).all(-1)
    unmasked = torch.cat([labels["a"], ours.padding["a"].expand(64, -1)], dim=-1)
    assert 0 < is_mask.sum() < 64
    torch.testing.assert_close(out[~is_mask, 0], unmasked[~is_mask])
    torch.testing.assert_close(out[:, 1], torch.cat([labels["b"], ours.padding["b"].expand(64, -1)], dim=-1))


@pytest.mark.parametrize("index_dims, max_resolution, num_bands", [
    ((1920,), (30720,), 192),        # HF multimodal audio
    ((224, 224), (224, 224), 64),    # HF Fourier image classifier
    ((55, 55), (56, 56), 64),        # HF conv-processing image classifier
])
def test_fourier_features_equal_hf_bitwise(index_dims, max_resolution, num_bands):
    # The highest bands amplify one-ulp position differences to ~1e-2, so demand equality.
    expected = hf.PerceiverFourierPositionEncoding(num_bands, max_resolution)(
        list(index_dims), 1, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(GridFourierEncoding(num_bands, max_resolution)(index_dims, 1), expected)


# Output adapters against HF.

def test_classification_projection_audio_outputs_match_hf(models):
    post = models["multimodal"].perceiver.output_postprocessor.modalities
    outputs = torch.randn(2, 3, CONFIG["output_num_channels"])
    for name, cls in [("label", ClassificationOutputAdapter), ("image", ProjectionOutputAdapter),
                      ("audio", AudioOutputAdapter)]:
        ours = cls.from_hf(post[name])
        torch.testing.assert_close(ours(outputs), post[name](outputs), msg=name)


def test_embedding_decoder_matches_hf_and_shares_weights(models):
    model = models["masked_lm"]
    tokens = TokenInputAdapter.from_hf(model.perceiver.input_preprocessor)
    ours = EmbeddingDecoderOutputAdapter.from_hf(model.embedding_decoder, tokens.embeddings)
    assert ours.embedding.weight is tokens.embeddings.weight
    hidden = torch.randn(2, 12, CONFIG["d_model"])
    expected = model.embedding_decoder(hidden, embedding_layer=model.perceiver.input_preprocessor.embeddings)
    torch.testing.assert_close(ours(hidden), expected)


def test_multimodal_output_matches_hf(models):
    post = models["multimodal"].perceiver.output_postprocessor
    sizes = {"audio": 4, "image": 6, "label": 1}
    outputs = torch.randn(2, 11, CONFIG["output_num_channels"])
    expected = post(outputs, modality_sizes=sizes)
    for ours, got in [
        (MultimodalOutputAdapter.from_hf(post), lambda m: m(outputs, sizes)),
        (MultimodalOutputAdapter.from_hf(post, sizes), lambda m: m(outputs)),
    ]:
        result = got(ours)
        assert result.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(result[name], expected[name], msg=name)
    as_dict = dict(zip(sorted(sizes), torch.split(outputs, [sizes[k] for k in sorted(sizes)], dim=1)))
    expected_dict = hf.PerceiverMultimodalPostprocessor(post.modalities, input_is_dict=True)(as_dict)
    result = MultimodalOutputAdapter.from_hf(post)(as_dict)
    for name in expected_dict:
        torch.testing.assert_close(result[name], expected_dict[name], msg=name)


def test_flow_output_matches_hf(models):
    model = models["flow"]
    decoder = model.perceiver.decoder
    queries = model.perceiver.input_preprocessor(torch.randn(2, 2, 27, 6, 8))[0]
    latents = torch.randn(2, CONFIG["num_latents"], CONFIG["d_latents"])
    raw = decoder.decoder(queries, latents).logits
    ours = FlowOutputAdapter.from_hf(decoder)
    torch.testing.assert_close(ours(raw), decoder(queries, latents).logits)


def test_dispatchers_pick_the_adapter(models):
    mm = models["multimodal"].perceiver
    assert isinstance(input_adapter_from_hf(models["masked_lm"].perceiver.input_preprocessor), TokenInputAdapter)
    assert isinstance(input_adapter_from_hf(models["flow"].perceiver.input_preprocessor), ImageInputAdapter)
    assert isinstance(input_adapter_from_hf(mm.input_preprocessor), MultimodalInputAdapter)
    assert isinstance(output_adapter_from_hf(mm.output_postprocessor), MultimodalOutputAdapter)
    assert isinstance(output_adapter_from_hf(models["flow"].perceiver.decoder), FlowOutputAdapter)
    assert not input_adapter_from_hf(mm.input_preprocessor).training
    with pytest.raises(TypeError, match="PerceiverEmbeddingDecoder"):
        output_adapter_from_hf(models["masked_lm"].embedding_decoder)
    with pytest.raises(TypeError, match="PerceiverMultimodalDecoder"):
        input_adapter_from_hf(mm.decoder)


# Bad inputs and settings.

def _image(prep_type, **kwargs):
    encoding = kwargs.pop("encoding", GridFourierEncoding(2, (4, 4)))
    return ImageInputAdapter(prep_type, encoding, **kwargs)


@pytest.mark.parametrize("adapter, bad, argument", [
    (TokenInputAdapter(10, 4, 6), torch.zeros(6, dtype=torch.long), "token_ids"),
    (TokenInputAdapter(10, 4, 6), torch.zeros(2, 7, dtype=torch.long), "token_ids"),
    (_image("pixels"), torch.randn(3, 4, 4), "images"),
    (_image("pixels"), torch.randn(2, 4, 4, 4), "images"),
    (_image("conv1x1"), torch.randn(2, 1, 3, 4, 4), "images"),
    (_image("patches", spatial_downsample=2), torch.randn(2, 3, 7, 8), "images"),
    (_image("patches", temporal_downsample=2), torch.randn(2, 3, 4, 4), "images"),
    (_image("patches", temporal_downsample=2), torch.randn(2, 3, 3, 4, 4), "images"),
    (_image("pixels"), torch.randn(2, 2, 3, 4, 4), "images"),
    (_image("pixels", encoding=TrainablePositionEncoding(16, 3), concat_or_add_pos="add"),
     torch.randn(2, 3, 5, 5), "images"),
    (AudioInputAdapter(4, GridFourierEncoding(2, (8,))), torch.randn(2, 30), "audio"),
    (AudioInputAdapter(4, GridFourierEncoding(2, (8,))), torch.randn(2, 32, 2), "audio"),
    (OneHotInputAdapter(5), torch.randn(2, 4), "labels"),
    (OneHotInputAdapter(5), torch.randn(2, 1, 5), "labels"),
    (MultimodalInputAdapter({"a": OneHotInputAdapter(2)}), {"b": torch.randn(2, 2)}, "inputs"),
    (MultimodalInputAdapter({"a": OneHotInputAdapter(2)}), torch.randn(2, 2), "inputs"),
    (ClassificationOutputAdapter(4, 3), torch.randn(2, 4), "outputs"),
    (ClassificationOutputAdapter(4, 3), torch.randn(2, 1, 5), "outputs"),
    (EmbeddingDecoderOutputAdapter(nn.Embedding(10, 4)), torch.randn(2, 3, 5), "outputs"),
    (ProjectionOutputAdapter(4, 3), torch.randn(2, 3, 5), "outputs"),
    (AudioOutputAdapter(4, 3), torch.randn(3, 4), "outputs"),
    (MultimodalOutputAdapter({"a": ProjectionOutputAdapter(4, 3)}, {"a": 2}), torch.randn(2, 3, 4), "outputs"),
    (MultimodalOutputAdapter({"a": ProjectionOutputAdapter(4, 3)}), torch.randn(2, 3, 4), "modality_sizes"),
    (MultimodalOutputAdapter({"a": ProjectionOutputAdapter(4, 3)}), {"b": torch.randn(2, 3, 4)}, "outputs"),
    (FlowOutputAdapter((2, 3)), torch.randn(2, 5, 2), "outputs"),
    (FlowOutputAdapter((2, 3)), torch.randn(6, 2), "outputs"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(adapter, bad, argument):
    with pytest.raises(ValueError, match=argument):
        adapter(bad)


def test_fourier_encoding_rejects_wrong_grid_rank():
    with pytest.raises(ValueError, match="index_dims"):
        GridFourierEncoding(2, (4, 4))((4,), 1)


@pytest.mark.parametrize("build, argument", [
    (lambda: _image("jpeg"), "prep_type"),
    (lambda: _image("pixels", concat_or_add_pos="mix"), "concat_or_add_pos"),
    (lambda: _image("pixels", concat_or_add_pos="add"), "concat_or_add_pos"),
    (lambda: _image("conv", spatial_downsample=2), "spatial_downsample"),
    (lambda: _image("conv1x1", temporal_downsample=2), "temporal_downsample"),
    (lambda: _image("pixels", conv_after_patching=True), "conv_after_patching"),
    (lambda: _image("pixels", spatial_downsample=0), "spatial_downsample"),
    (lambda: MultimodalInputAdapter({}), "modalities"),
    (lambda: MultimodalInputAdapter({"a": OneHotInputAdapter(2)}, mask_probs={"b": 0.5}), "mask_probs"),
    (lambda: MultimodalInputAdapter({"a": OneHotInputAdapter(2)}, mask_probs={"a": 1.5}), "mask_probs"),
    (lambda: FlowOutputAdapter((6,)), "output_image_shape"),
])
def test_bad_settings_raise_value_error(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_position_encoding_must_be_supported():
    with pytest.raises(TypeError, match="position_encoding"):
        ImageInputAdapter("pixels", nn.Identity())
