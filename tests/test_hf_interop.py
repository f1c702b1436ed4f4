"""perceiver.from_hf: converted HF Perceiver models return the HF logits (small random configs)."""

import pytest
import torch
import transformers
from transformers import PerceiverConfig

import perceiver
from perceiver.interop import hf_key_padding_mask

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
SMALL = dict(num_latents=6, d_latents=24, num_blocks=2, num_self_attends_per_block=2,
             num_self_attention_heads=2, num_cross_attention_heads=1)


def convert(model_class, **config):
    torch.manual_seed(0)
    hf_model = model_class(PerceiverConfig(**SMALL, **config)).eval()
    return hf_model, perceiver.from_hf(hf_model).eval()


def test_masked_lm_with_and_without_attention_mask():
    hf_model, ours = convert(transformers.PerceiverForMaskedLM, vocab_size=50, max_position_embeddings=20, d_model=32)
    tokens = torch.randint(0, 50, (3, 20))
    attention_mask = torch.ones(3, 20, dtype=torch.long)
    attention_mask[1, 12:] = 0
    attention_mask[2, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_model(inputs=tokens).logits, **TOLERANCE)
        expected = hf_model(inputs=tokens, attention_mask=attention_mask).logits
        torch.testing.assert_close(ours(tokens, key_padding_mask=hf_key_padding_mask(attention_mask)), expected,
                                   **TOLERANCE)


@pytest.mark.parametrize("model_class,config", [
    (transformers.PerceiverForImageClassificationLearned, dict(image_size=8, d_model=512, num_labels=5)),
    (transformers.PerceiverForImageClassificationFourier, dict(image_size=8, d_model=261, num_labels=5)),
    (transformers.PerceiverForImageClassificationConvProcessing, dict(image_size=16, d_model=322, num_labels=5)),
], ids=["learned", "fourier", "conv"])
def test_image_classification(model_class, config):
    hf_model, ours = convert(model_class, **config)
    size = config["image_size"]
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = hf_model(inputs=pixels).logits
        assert expected.shape == (2, 5)
        torch.testing.assert_close(ours(pixels), expected, **TOLERANCE)


def test_optical_flow():
    hf_model, ours = convert(transformers.PerceiverForOpticalFlow, train_size=[8, 12], d_model=322)
    frames = torch.randn(1, 2, 27, 8, 12)  # two frames of 3x3 patches of RGB pixels, as HF expects
    with torch.no_grad():
        expected = hf_model(inputs=frames).logits
        torch.testing.assert_close(ours(frames), expected, **TOLERANCE)


def test_converted_model_owns_its_weights_and_refuses_unknown_models():
    hf_model, ours = convert(transformers.PerceiverForImageClassificationFourier, image_size=8, d_model=261,
                             num_labels=5)
    hf_ptrs = {p.data_ptr() for p in hf_model.parameters()}
    assert not any(p.data_ptr() in hf_ptrs for p in ours.parameters())
    with pytest.raises(NotImplementedError, match="PerceiverForSequenceClassification"):
        perceiver.from_hf(transformers.PerceiverForSequenceClassification(PerceiverConfig(**SMALL, d_model=32)))


def test_multimodal_autoencoding_with_subsampled_outputs():
    from perceiver.interop import multimodal_decode

    config = dict(num_frames=2, audio_samples_per_frame=16, samples_per_patch=4, image_size=8,
                  output_shape=[1, 2, 8, 8], output_num_channels=8, num_labels=3, _label_trainable_num_channels=8)
    probe = transformers.PerceiverForMultimodalAutoencoding(PerceiverConfig(**SMALL, **config))
    width = probe.perceiver.input_preprocessor.num_channels  # the encoder's kv width must match it
    hf_model, ours = convert(transformers.PerceiverForMultimodalAutoencoding, d_model=width, **config)
    inputs = {
        "audio": torch.randn(2, 32, 1),
        "image": torch.randn(2, 2, 3, 8, 8),
        "label": torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float(),
    }
    points = {"audio": torch.tensor([0, 5, 7, 2]), "image": torch.arange(0, 128, 9), "label": None}
    with torch.no_grad():
        expected = hf_model(inputs=inputs, subsampled_output_points=points).logits
        got = multimodal_decode(ours, inputs, points)
        chunked = multimodal_decode(ours, inputs, points, chunk_size=5)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE, msg=name)
        torch.testing.assert_close(chunked[name], expected[name], **TOLERANCE, msg=name)
    with torch.no_grad():
        full = ours(inputs)  # every output of every modality, in bounded-memory chunks if asked
    assert full["image"].shape == (2, 128, 3) and full["audio"].shape == (2, 32) and full["label"].shape == (2, 3)
