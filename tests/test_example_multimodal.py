"""The multimodal autoencoding example at a tiny size: it trains, saves, reloads and decodes consistently."""

import json

import pytest
import torch

from examples import common
from examples.multimodal import (
    MultimodalConfig,
    build_model,
    evaluate,
    fixed_data,
    reconstruct,
    subsampled_targets,
    train,
)
from perceiver.interop import multimodal_decode

TINY = MultimodalConfig(
    num_classes=4, frames=2, image_size=8, blob_sigma=1.5, audio_samples=128, patch_size=4, samples_per_patch=16,
    input_bands=4, query_bands=4, label_query_channels=8, num_latents=8, latent_dim=32, num_layers=1, num_heads=2,
    decoder_heads=2, decoder_dim=16, steps=40, batch_size=8, lr=3e-3, warmup_steps=5, video_points=32,
    audio_points=4, test_examples=16, eval_batch_size=8, chunk_size=7,
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multimodal")
    metrics = train(TINY, out_dir, CPU, seed=0, show_progress=False)
    return out_dir, metrics


def test_loss_goes_down_and_files_are_written(trained):
    out_dir, metrics = trained
    history = metrics["loss_history"]
    assert len(history) == TINY.steps
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    line = common.finish("multimodal", out_dir, metrics, 1.0, CPU)
    assert line.startswith("RESULT multimodal: ") and "loss_history" not in line
    for name in ("checkpoint.pt", "curve.png", "metrics.json"):
        assert (out_dir / name).is_file()
    saved = json.loads((out_dir / "metrics.json").read_text())
    for name in ("video_psnr", "video_psnr_mean_baseline", "audio_psnr", "audio_psnr_mean_baseline",
                 "label_accuracy", "label_chance"):
        assert isinstance(saved[name], float)


def test_checkpoint_reproduces_the_trained_model(trained):
    out_dir, metrics = trained
    model, config = common.load_checkpoint(out_dir / "checkpoint.pt", MultimodalConfig, build_model)
    assert config == TINY
    model.eval()
    test_set, means, _ = fixed_data(config, seed=0)
    # The metrics are sums over every reconstructed value: any difference in the outputs would show.
    reloaded = evaluate(model, config, test_set, means, CPU)
    assert reloaded == {name: metrics[name] for name in reloaded}


def test_chunked_and_subsampled_decoding_match_a_full_decode(trained):
    out_dir, _ = trained
    model, config = common.load_checkpoint(out_dir / "checkpoint.pt", MultimodalConfig, build_model)
    model.eval()
    (inputs, _), _, _ = fixed_data(config, seed=0)
    inputs = {name: x[:5] for name, x in inputs.items()}
    with torch.no_grad():
        full = model(inputs)  # one decode of every query, no chunks
    chunked = reconstruct(model, inputs, chunk_size=7)  # 7 divides no modality's query count
    torch.testing.assert_close(chunked["video"], full["video"][..., 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked["audio"], full["audio"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked["label"], full["label"], rtol=1e-5, atol=1e-6)

    video_index = torch.tensor([100, 3, 64, 127, 0])
    audio_index = torch.tensor([5, 1])
    with torch.no_grad():
        subset = multimodal_decode(model, inputs, {"audio": audio_index, "label": None, "video": video_index})
    patches = full["audio"].reshape(5, -1, config.samples_per_patch)
    torch.testing.assert_close(subset["video"], full["video"][:, video_index], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(subset["audio"], patches[:, audio_index].reshape(5, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(subset["label"], full["label"], rtol=1e-5, atol=1e-6)

    # The training targets are the values at the decoded points: video query i is pixel
    # (t, h, w) = unravel(i, (frames, size, size)), audio query j is samples [j * spp, (j + 1) * spp).
    targets = subsampled_targets(config, inputs, video_index, audio_index)
    t, h, w = torch.unravel_index(video_index, (config.frames, config.image_size, config.image_size))
    torch.testing.assert_close(targets["video"], inputs["video"][:, t, 0, h, w], rtol=0, atol=0)
    spp = config.samples_per_patch
    expected_audio = torch.cat([inputs["audio"][:, j * spp:(j + 1) * spp] for j in audio_index.tolist()], dim=1)
    torch.testing.assert_close(targets["audio"], expected_audio, rtol=0, atol=0)
