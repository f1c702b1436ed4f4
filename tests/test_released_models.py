"""The six HF Perceiver models converted by from_hf run every attention on the backend asked for.

perceiver.use_backend puts a converted model's attentions on one backend; a spy on the
op's dispatch records the backend each call chose. On the CPU (small configurations)
every call runs the torch backend; on a GPU, at the released sizes (heads of 261, 322
and 512 channels, the language model's 32/160 and 32/96, decoders up to 1280 wide), the
CUDA C++ kernels serve every attention, the wide ones included, with HF's logits.
"""

from __future__ import annotations

import pytest
import torch

import perceiver
from perceiver_kernels import dispatch
from tests.test_hf_configs import MODELS, assert_same_logits, build, inputs_for

transformers = pytest.importorskip("transformers")
from transformers import PerceiverConfig  # noqa: E402

# The released configurations (HF's conversion of DeepMind's checkpoints), random weights.
IMAGE = dict(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
             num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224, num_labels=1000)
RELEASED = {
    "masked_lm": dict(d_model=768, d_latents=1280, num_latents=256, num_blocks=1, num_self_attends_per_block=26,
                      num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280,
                      vocab_size=262, max_position_embeddings=2048),
    "learned": dict(IMAGE, d_model=512),
    "fourier": dict(IMAGE, d_model=261),
    "conv": dict(IMAGE, d_model=322),
    "flow": dict(num_latents=2048, d_latents=512, d_model=322, num_blocks=1, num_self_attends_per_block=24,
                 num_self_attention_heads=16, num_cross_attention_heads=1, train_size=[368, 496]),
}


@pytest.fixture
def chosen_backends(monkeypatch):
    """The names of the backends cross_attention chose, call by call."""
    chosen = []
    real = dispatch.select

    def spy(problem, backend):
        impl = real(problem, backend)
        chosen.append(impl.name)
        return impl

    monkeypatch.setattr(dispatch, "select", spy)
    return chosen


def run_both(hf_model, ours, kind, config):
    inputs = inputs_for(kind, config)
    with torch.no_grad():
        expected = hf_model(inputs=inputs).logits
        got = ours(inputs)
    return got, expected


def test_use_backend_sets_every_attention_and_checks_the_name():
    model = perceiver.from_hf(build("fourier"))
    assert perceiver.use_backend(model, "torch") is model
    attentions = [m for m in model.modules() if isinstance(m, (perceiver.CrossAttention, perceiver.MultiHeadAttention))]
    assert attentions and all(m.backend == "torch" for m in attentions)
    with pytest.raises(ValueError, match="backend"):
        perceiver.use_backend(model, "flash")


@pytest.mark.parametrize("kind", [k for k in MODELS if k != "multimodal"])
def test_every_attention_of_a_converted_model_runs_the_backend_asked_for(kind, chosen_backends):
    hf_model = build(kind)
    ours = perceiver.use_backend(perceiver.from_hf(hf_model), "torch")
    got, expected = run_both(hf_model, ours, kind, hf_model.config)
    assert chosen_backends and set(chosen_backends) == {"torch"}
    assert_same_logits(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(RELEASED))
def test_released_models_run_every_attention_on_the_cuda_kernels(kind, chosen_backends):
    model_class, _ = MODELS[kind]
    config = PerceiverConfig(**RELEASED[kind])
    torch.manual_seed(0)
    hf_model = model_class(config).eval()
    ours = perceiver.use_backend(perceiver.from_hf(hf_model).eval(), "cuda").cuda()
    hf_model.cuda()
    inputs = inputs_for(kind, config)[:1].cuda()
    with torch.no_grad():
        expected = hf_model(inputs=inputs).logits
        got = ours(inputs)
    assert chosen_backends and set(chosen_backends) == {"cuda"}, set(chosen_backends)
    # fp32 on both sides: the CUDA kernels' fp32 path is exact (no TF32).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
