"""Multimodal autoencoding (the Perceiver IO paper's Kinetics experiment) at small scale, on synthetic data.

Each example is a short single-channel video of a Gaussian blob moving (with
wrap-around) in a direction set by its class, a clip of audio whose two partials
have frequencies set by the same class (random amplitudes and phases, plus noise),
and the class label. The Perceiver IO reads video patches, audio patches and the
one-hot label (always replaced by a mask token, as in the paper, so the class must
be inferred from the signals) and reconstructs every video pixel, every audio
sample and the label logits from one query per output point.

Training decodes a random subset of the output points at each step (subsampled
decoding, as the paper does for its ~800k outputs); evaluation reconstructs the
full outputs of held-out examples in chunks under torch.no_grad(), so that decoder
activations stay bounded by the chunk size whatever the output size.

    python -m examples.multimodal            # CPU, a few minutes
    python -m examples.multimodal --full     # bigger data and model, for a GPU
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from perceiver import (
    FourierPositionEncoding,
    MultimodalQueries,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    PerceiverProcessor,
    TrainablePositionEncoding,
)
from perceiver.adapters import (
    AudioInputAdapter,
    AudioOutputAdapter,
    ClassificationOutputAdapter,
    GridFourierEncoding,
    ImageInputAdapter,
    MultimodalInputAdapter,
    MultimodalOutputAdapter,
    OneHotInputAdapter,
    ProjectionOutputAdapter,
)
from perceiver.interop import multimodal_decode

from . import common

NAME = "multimodal"
# PSNR peak-to-peak ranges: video pixels lie in [0, 1], audio samples in [-1, 1].
VIDEO_RANGE = 1.0
AUDIO_RANGE = 2.0


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    # Data.
    num_classes: int = 8
    frames: int = 8
    image_size: int = 16
    blob_sigma: float = 2.0  # pixels
    blob_speed: float = 1.0  # pixels per frame
    audio_samples: int = 1024
    audio_noise: float = 0.05  # standard deviation of the added white noise
    # Model.
    patch_size: int = 4  # video input patches: 1 frame x patch_size x patch_size pixels
    samples_per_patch: int = 64  # audio input patches, and the samples one audio query decodes
    input_bands: int = 8  # Fourier bands per dimension of the input positions
    query_bands: int = 8  # Fourier bands per dimension of the output queries
    label_query_channels: int = 32
    num_latents: int = 64
    latent_dim: int = 96
    num_layers: int = 3
    num_heads: int = 4
    encoder_heads: int = 1
    decoder_heads: int = 4
    decoder_widening: int = 2
    decoder_dim: int = 64  # decoder output channels, read by the per-modality output adapters
    attention_gain: float = 8.0  # scales the initial query projections of both cross-attentions, see build_model
    # Training.
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    video_points: int = 512  # video pixels decoded per training step (of frames * image_size^2)
    audio_points: int = 8  # audio patches decoded per training step (of audio_samples / samples_per_patch)
    # Evaluation.
    test_examples: int = 256
    eval_batch_size: int = 64
    chunk_size: int = 512  # queries per decoder chunk in the full reconstruction


DEFAULT = MultimodalConfig()
# The same relative blob size (sigma = image_size / 8) and cycles per clip; 32x the video pixels, 8x the audio.
FULL = MultimodalConfig(
    num_classes=16, frames=16, image_size=64, blob_sigma=8.0, blob_speed=4.0, audio_samples=8192,
    patch_size=8, samples_per_patch=64, input_bands=16, query_bands=16, num_latents=256, latent_dim=256,
    num_layers=6, num_heads=8, decoder_dim=128, steps=20_000, batch_size=32, lr=5e-4, warmup_steps=500,
    video_points=4096, audio_points=32, test_examples=1024, eval_batch_size=32, chunk_size=8192,
)


def video_pixels(config: MultimodalConfig) -> int:
    return config.frames * config.image_size**2


def audio_patches(config: MultimodalConfig) -> int:
    return config.audio_samples // config.samples_per_patch


def make_batch(config: MultimodalConfig, batch_size: int, generator: torch.Generator
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random examples on the CPU: inputs {"audio": (B, audio_samples), "label": one-hot (B, num_classes),
    "video": (B, frames, 1, image_size, image_size)} and the class ids (B,)."""
    k, size, frames, samples = config.num_classes, config.image_size, config.frames, config.audio_samples
    labels = torch.randint(k, (batch_size,), generator=generator)

    # Video: the blob starts anywhere and moves in one of k directions; the torus keeps it whole.
    angle = 2 * math.pi * labels / k
    velocity = config.blob_speed * torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)  # (B, 2): rows, cols
    start = torch.rand(batch_size, 2, generator=generator) * size
    t = torch.arange(frames, dtype=torch.float32)
    centers = start[:, None] + t[None, :, None] * velocity[:, None]  # (B, T, 2)
    grid = torch.arange(size, dtype=torch.float32)
    # Signed distance on the torus, in [-size / 2, size / 2).
    rows = torch.remainder(grid[None, None, :] - centers[..., 0:1] + size / 2, size) - size / 2  # (B, T, H)
    cols = torch.remainder(grid[None, None, :] - centers[..., 1:2] + size / 2, size) - size / 2  # (B, T, W)
    squared = rows[..., :, None] ** 2 + cols[..., None, :] ** 2
    video = torch.exp(-squared / (2 * config.blob_sigma**2))[:, :, None]

    # Audio: a fundamental and its second harmonic, at a class-specific number of cycles per clip.
    cycles = 4.0 + 3.0 * labels.float()  # up to 4 + 3 * 15 = 49 (98 for the harmonic) cycles per clip
    amplitude = torch.stack([0.3 + 0.2 * torch.rand(batch_size, generator=generator),
                             0.1 + 0.2 * torch.rand(batch_size, generator=generator)], dim=-1)  # (B, 2)
    phase = 2 * math.pi * torch.rand(batch_size, 2, generator=generator)
    n = torch.arange(samples, dtype=torch.float32) / samples
    harmonic = torch.tensor([1.0, 2.0])
    partials = amplitude[..., None] * torch.sin(
        2 * math.pi * (cycles[:, None, None] * harmonic[None, :, None]) * n + phase[..., None])  # (B, 2, N)
    noise = config.audio_noise * torch.randn(batch_size, samples, generator=generator)
    audio = (partials.sum(dim=1) + noise).clamp(-1.0, 1.0)

    inputs = {"audio": audio, "label": F.one_hot(labels, k).float(), "video": video}
    return inputs, labels


def build_model(config: MultimodalConfig) -> PerceiverIO:
    """The paper's multimodal autoencoder at config's sizes.

    Inputs {"audio", "label", "video"} (see make_batch) -> {"audio": (B, n * samples_per_patch),
    "label": logits (B, num_classes), "video": (B, n, 1)} for the decoded points.
    """
    patches_per_side = config.image_size // config.patch_size
    video_grid = (config.frames, patches_per_side, patches_per_side)
    input_adapter = MultimodalInputAdapter(
        {
            "audio": AudioInputAdapter(config.samples_per_patch,
                                       GridFourierEncoding(config.input_bands, (audio_patches(config),))),
            "label": OneHotInputAdapter(config.num_classes),
            "video": ImageInputAdapter("patches", GridFourierEncoding(config.input_bands, video_grid),
                                       in_channels=1, spatial_downsample=config.patch_size),
        },
        # Probability 1: the label is never seen, so decoding it is classification.
        mask_probs={"label": 1.0},
    )
    # In sorted name order, the order MultimodalOutputAdapter splits the decoder's output in.
    queries = MultimodalQueries({
        "audio": FourierPositionEncoding((audio_patches(config),), config.query_bands),
        "label": TrainablePositionEncoding(1, config.label_query_channels),
        "video": FourierPositionEncoding((config.frames, config.image_size, config.image_size), config.query_bands),
    })
    encoder = PerceiverEncoder(input_adapter.num_channels, config.num_latents, config.latent_dim,
                               num_heads=config.encoder_heads)
    processor = PerceiverProcessor(config.latent_dim, num_layers_per_block=config.num_layers,
                                   num_heads=config.num_heads)
    # The query width (Fourier channels + padding) need not divide into heads: attend at latent_dim.
    decoder = PerceiverDecoder(queries.num_channels, config.latent_dim, config.decoder_dim,
                               qk_channels=config.latent_dim, v_channels=config.latent_dim,
                               num_heads=config.decoder_heads, widening_factor=config.decoder_widening)
    # Default Linear init gives nearly uniform attention (logits of std ~1/3): every latent then reads
    # the same average of the inputs and every output query the same average of the latents, a
    # symmetric start that training did not leave (the video loss stayed at the mean predictor's for
    # 1000 steps, and so it did with the gain on only one of the two). Sharper initial
    # attention gives each latent and each query its own random receptive field from the first step.
    with torch.no_grad():
        for attention in (encoder.cross_attention.attention, decoder.cross_attention.attention):
            attention.query.weight.mul_(config.attention_gain)
    output_adapter = MultimodalOutputAdapter(
        {
            "audio": AudioOutputAdapter(config.decoder_dim, config.samples_per_patch),
            "label": ClassificationOutputAdapter(config.decoder_dim, config.num_classes),
            "video": ProjectionOutputAdapter(config.decoder_dim, 1),
        },
        queries.sizes,
    )
    return PerceiverIO(encoder, processor, decoder, queries, input_adapter, output_adapter)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def subsampled_targets(config: MultimodalConfig, inputs: dict[str, torch.Tensor], video_index: torch.Tensor,
                       audio_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The true values at the decoded points: "video" (B, n_video), "audio" (B, n_audio * samples_per_patch)."""
    batch = inputs["video"].shape[0]
    video = inputs["video"].reshape(batch, -1)  # (T, 1, H, W) row-major = the video queries' (T, H, W) order
    audio = inputs["audio"].reshape(batch, audio_patches(config), config.samples_per_patch)
    return {"video": video[:, video_index.to(video.device)],
            "audio": audio[:, audio_index.to(audio.device)].reshape(batch, -1)}


@torch.no_grad()
def reconstruct(model: PerceiverIO, inputs: dict[str, torch.Tensor], chunk_size: int | None
                ) -> dict[str, torch.Tensor]:
    """Every output point, decoded chunk_size queries at a time (None: all at once).

    -> {"audio": (B, audio_samples), "label": logits (B, num_classes), "video": (B, frames * image_size^2)}.
    """
    outputs = multimodal_decode(model, inputs, {name: None for name in model.queries.sizes}, chunk_size)
    return {**outputs, "video": outputs["video"][..., 0]}


def psnr(mse: float, signal_range: float) -> float:
    return 10.0 * math.log10(signal_range**2 / mse)


def evaluate(model: PerceiverIO, config: MultimodalConfig, test_set: tuple[dict[str, torch.Tensor], torch.Tensor],
             means: dict[str, float], device: torch.device) -> dict[str, float]:
    """Video and audio PSNR = 10 log10(range^2 / MSE), the MSE pooled over the whole test set, of the
    full chunked reconstructions (clamped to the signal ranges) and of predicting the mean of the
    modality (`means`); label accuracy and chance."""
    inputs, labels = test_set
    was_training = model.training
    model.eval()
    squared = {"video": 0.0, "audio": 0.0}
    baseline = {"video": 0.0, "audio": 0.0}
    correct = 0
    for start in range(0, labels.shape[0], config.eval_batch_size):
        batch = to_device({name: x[start:start + config.eval_batch_size] for name, x in inputs.items()}, device)
        outputs = reconstruct(model, batch, config.chunk_size)
        targets = {"video": batch["video"].reshape(batch["video"].shape[0], -1), "audio": batch["audio"]}
        predictions = {"video": outputs["video"].clamp(0.0, VIDEO_RANGE),
                       "audio": outputs["audio"].clamp(-AUDIO_RANGE / 2, AUDIO_RANGE / 2)}
        for name in squared:
            squared[name] += (predictions[name] - targets[name]).pow(2).sum().item()
            baseline[name] += (means[name] - targets[name]).pow(2).sum().item()
        correct += (outputs["label"].argmax(-1).cpu() == labels[start:start + config.eval_batch_size]).sum().item()
    model.train(was_training)
    count = {"video": labels.shape[0] * video_pixels(config), "audio": labels.shape[0] * config.audio_samples}
    return {
        "video_psnr": psnr(squared["video"] / count["video"], VIDEO_RANGE),
        "video_psnr_mean_baseline": psnr(baseline["video"] / count["video"], VIDEO_RANGE),
        "audio_psnr": psnr(squared["audio"] / count["audio"], AUDIO_RANGE),
        "audio_psnr_mean_baseline": psnr(baseline["audio"] / count["audio"], AUDIO_RANGE),
        "label_accuracy": correct / labels.shape[0],
        "label_chance": 1.0 / config.num_classes,
    }


def fixed_data(config: MultimodalConfig, seed: int
               ) -> tuple[tuple[dict[str, torch.Tensor], torch.Tensor], dict[str, float], dict[str, float]]:
    """The held-out test set (make_batch's output for test_examples), and the mean and variance of the
    video and audio values, estimated on a separate sample; each from a generator of its own, so that
    training (seeded with `seed`) never draws them."""
    test_set = make_batch(config, config.test_examples, torch.Generator().manual_seed(seed + 1_000_003))
    reference, _ = make_batch(config, 256, torch.Generator().manual_seed(seed + 2_000_003))
    means = {name: reference[name].mean().item() for name in ("video", "audio")}
    variances = {name: reference[name].var().item() for name in ("video", "audio")}
    return test_set, means, variances


def train(config: MultimodalConfig, out_dir: Path, device: torch.device, seed: int = 0,
          show_progress: bool = True) -> dict:
    """Trains on subsampled outputs, evaluates full chunked reconstructions, saves checkpoint and curve.

    The loss is the sum of three terms that are each 1 for a trivial predictor: video and
    audio MSE divided by the modality's variance (so 1 = predicting the mean) and label
    cross-entropy divided by log(num_classes) (so 1 = uniform logits).
    """
    torch.manual_seed(seed)
    model = build_model(config).to(device)
    data = torch.Generator().manual_seed(seed)
    test_set, means, variances = fixed_data(config, seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / config.warmup_steps, 0.5 * (1 + math.cos(math.pi * step / config.steps))))
    history = {"total": [], "video": [], "audio": [], "label": []}
    steps = range(config.steps)
    bar = common.progress(steps, config.steps, NAME) if show_progress else None
    for step in bar if bar is not None else steps:
        inputs, labels = make_batch(config, config.batch_size, data)
        video_index = torch.randperm(video_pixels(config), generator=data)[:config.video_points]
        audio_index = torch.randperm(audio_patches(config), generator=data)[:config.audio_points]
        targets = subsampled_targets(config, inputs, video_index, audio_index)
        inputs, labels, targets = to_device(inputs, device), labels.to(device), to_device(targets, device)
        outputs = multimodal_decode(model, inputs, {"audio": audio_index, "label": None, "video": video_index})
        terms = {
            "video": F.mse_loss(outputs["video"][..., 0], targets["video"]) / variances["video"],
            "audio": F.mse_loss(outputs["audio"], targets["audio"]) / variances["audio"],
            "label": F.cross_entropy(outputs["label"], labels) / math.log(config.num_classes),
        }
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history["total"].append(loss.item())
        for name, term in terms.items():
            history[name].append(term.item())
        if bar is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{history['total'][-1]:.3f}")

    metrics = {**evaluate(model, config, test_set, means, device),
               "final_loss": common.smoothed(history["total"])[-1],  # the mean of the last 50 steps
               "loss_history": history["total"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint(out_dir / "checkpoint.pt", model, config, metrics)
    x = list(range(1, config.steps + 1))
    common.plot_curves(out_dir / "curve.png",
                       {f"{name} (smoothed)": (x, common.smoothed(values)) for name, values in history.items()},
                       "multimodal autoencoding: training loss (each term 1 = trivial predictor)", "loss")
    return metrics


def main() -> None:
    common.run_example(NAME, __doc__.splitlines()[0], DEFAULT, FULL, train)


if __name__ == "__main__":
    main()
