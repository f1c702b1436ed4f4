"""Optical flow with Perceiver IO on generated image pairs (no downloads).

Data: a random texture (blurred noise at two scales, per channel) is the second
frame; the first frame samples it at p + flow(p), where the flow is a global
translation plus a random low-frequency field. So flow(p) is the forward flow of
the Sintel / HF convention: the pixel at p in frame 1 is at p + flow(p) in frame 2.
Both frames are cut from a larger canvas, so no sample ever falls off the texture.

Model (as HF PerceiverForOpticalFlow, scaled down): each pixel's 3x3 patches of both
frames, projected by a Linear and concatenated with Fourier positions, are both the
encoder inputs and the decoder queries (PerceiverIO(queries=None)); the decoder
outputs 2 flow channels per pixel. Loss: the end-point error (EPE), the mean over
pixels of the L2 norm of the flow error; the test EPE is compared with that of
predicting zero flow.

    python -m examples.flow            # CPU-sized, a few minutes
    python -m examples.flow --full     # GPU-sized
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import torch
from torch import nn
from torch.nn import functional as F

from examples import common
from perceiver.adapters import FlowOutputAdapter, GridFourierEncoding, ImageInputAdapter
from perceiver.model import PerceiverDecoder, PerceiverEncoder, PerceiverIO, PerceiverProcessor

NAME = "flow"
# The held-out test set is the same whatever the training seed.
TEST_SEED = 1_000_003


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    steps: int
    batch_size: int
    image_size: int  # frames are image_size x image_size
    channels: int = 3
    max_translation: float = 2.0  # pixels, per component of the global translation
    max_local: float = 1.0  # pixels, per component of the low-frequency field
    feature_dim: int = 32  # width of the projected patches
    num_bands: int = 8  # Fourier bands per spatial dimension
    num_latents: int = 64
    latent_dim: int = 64
    num_layers: int = 2  # processor self-attention layers
    num_heads: int = 4
    widening_factor: int = 2
    lr: float = 2e-3
    warmup_steps: int = 50
    test_pairs: int = 256
    eval_batch_size: int = 64


DEFAULT = FlowConfig(steps=1000, batch_size=16, image_size=20)
FULL = FlowConfig(steps=20_000, batch_size=32, image_size=64, max_translation=4.0, max_local=2.0, feature_dim=64,
                  num_bands=32, num_latents=256, latent_dim=256, num_layers=6, num_heads=8, widening_factor=4,
                  lr=5e-4, warmup_steps=1000, test_pairs=512)


# ---------------------------------------------------------------- data


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W), separable Gaussian blur with reflected borders."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = images.shape
    flat = F.pad(images.reshape(n * c, 1, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def random_textures(n: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, channels, size, size) textures with zero mean and unit std per image and channel.

    Fine detail (sigma 1) pins the flow down to a fraction of a pixel; coarse structure
    (sigma 3) keeps displacements of several pixels unambiguous.
    """
    device = generator.device
    noise = torch.randn(n, channels, size, size, generator=generator, device=device)
    weights = torch.rand(n, channels, 1, 1, generator=generator, device=device)
    texture = weights * _gaussian_blur(noise, 1.0) + (1 - weights) * 3.0 * _gaussian_blur(noise, 3.0)
    texture = texture - texture.mean(dim=(2, 3), keepdim=True)
    return texture / texture.std(dim=(2, 3), keepdim=True)


def random_flows(n: int, size: int, max_translation: float, max_local: float,
                 generator: torch.Generator) -> torch.Tensor:
    """(n, 2, size, size) flows in pixels, channels (x, y): a uniform global translation
    in [-max_translation, max_translation]^2 plus a field bilinearly upsampled from a
    4x4 grid of uniform values in [-max_local, max_local] (so no component exceeds
    max_translation + max_local)."""
    device = generator.device
    translation = (2 * torch.rand(n, 2, 1, 1, generator=generator, device=device) - 1) * max_translation
    coarse = (2 * torch.rand(n, 2, 4, 4, generator=generator, device=device) - 1) * max_local
    local = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return translation + local


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """out[:, :, y, x] = images[:, :, y + flow_y, x + flow_x], bilinear.

    images (N, C, H, W), flow (N, 2, H, W) in pixels, channels (x, y). Samples outside
    the image read zeros; make_pairs never asks for any.
    """
    n, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=images.dtype),
                            torch.arange(w, device=images.device, dtype=images.dtype), indexing="ij")
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    # align_corners=True maps -1 and 1 to the centres of the first and last pixels.
    grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def make_pairs(n: int, config: FlowConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n frame pairs (n, 2, C, S, S) and their flows (n, S, S, 2), channels (x, y), S = config.image_size.

    frames[:, 0] at p shows frames[:, 1] at p + flow(p). The texture and the flow live on
    a canvas wider than S by a margin that exceeds the largest displacement, and both
    frames are its centre crop, so every sample of frame 1 falls inside the texture.
    """
    size = config.image_size
    margin = math.ceil(config.max_translation + config.max_local) + 1
    canvas = size + 2 * margin
    second = random_textures(n, config.channels, canvas, generator)
    flow = random_flows(n, canvas, config.max_translation, config.max_local, generator)
    first = warp(second, flow)
    crop = slice(margin, margin + size)
    frames = torch.stack([first[..., crop, crop], second[..., crop, crop]], dim=1)
    return frames, flow[..., crop, crop].permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------- model


class FramePatches(nn.Module):
    """Frames (B, 2, C, H, W) -> (B, 2, 9C, H, W): every pixel's 3x3 neighbourhood, zero padded.

    HF's optical flow takes such precomputed patches; doing it in the model keeps the
    model's input the raw frames.
    """

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = frames.shape
        patches = F.unfold(frames.reshape(b * t, c, h, w), kernel_size=3, padding=1)
        return patches.reshape(b, t, 9 * c, h, w)


def build_model(config: FlowConfig) -> PerceiverIO:
    """Frames (B, 2, C, S, S) -> flow (B, S, S, 2) in pixels."""
    size = config.image_size
    adapter = ImageInputAdapter(
        "patches", GridFourierEncoding(config.num_bands, (size, size)), in_channels=9 * config.channels,
        out_channels=config.feature_dim, spatial_downsample=1, temporal_downsample=2, conv_after_patching=True,
    )
    encoder = PerceiverEncoder(adapter.num_channels, config.num_latents, config.latent_dim)
    processor = PerceiverProcessor(config.latent_dim, num_layers_per_block=config.num_layers,
                                   num_heads=config.num_heads, widening_factor=config.widening_factor)
    decoder = PerceiverDecoder(adapter.num_channels, config.latent_dim, output_dim=2)
    # rescale_factor 1: the decoder predicts pixels directly (HF's 100 suits its weights, not a fresh start).
    return PerceiverIO(encoder, processor, decoder, queries=None,
                       input_adapter=nn.Sequential(FramePatches(), adapter),
                       output_adapter=FlowOutputAdapter((size, size), rescale_factor=1.0))


def end_point_error(predicted: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the flow error over (B, H, W, 2) -> a scalar."""
    return torch.linalg.vector_norm(predicted - flow, dim=-1).mean()


# ---------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, frames: torch.Tensor, flow: torch.Tensor, batch_size: int) -> float:
    """The model's EPE on frames (N, 2, C, S, S) with flows (N, S, S, 2), in eval mode."""
    model.eval()
    total = 0.0
    for start in range(0, frames.shape[0], batch_size):
        predicted = model(frames[start:start + batch_size])
        total += end_point_error(predicted, flow[start:start + batch_size]).item() * predicted.shape[0]
    return total / frames.shape[0]


def train(config: FlowConfig, out_dir: Path, device, seed: int = 0, show_progress: bool = True) -> dict:
    """Trains a fresh build_model(config) on new pairs every step, evaluates it on a fixed
    held-out set, saves out_dir/checkpoint.pt and out_dir/curve.png; returns the metrics
    (loss_history: the per-step training EPE).
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    model = build_model(config).to(device)
    train_generator = torch.Generator(device=device).manual_seed(seed)
    test_generator = torch.Generator(device=device).manual_seed(TEST_SEED)
    test_frames, test_flow = make_pairs(config.test_pairs, config, test_generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    # Linear warmup, then cosine decay to zero: the last steps average out the noise of small batches.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / config.warmup_steps,
        0.5 * (1 + math.cos(math.pi * step / config.steps))))
    loss_history = []
    bar = common.progress(range(config.steps), config.steps, NAME) if show_progress else range(config.steps)
    model.train()
    for step in bar:
        frames, flow = make_pairs(config.batch_size, config, train_generator)
        loss = end_point_error(model(frames), flow)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_history.append(loss.item())
        if show_progress and step % 10 == 0:
            bar.set_postfix(epe=f"{sum(loss_history[-50:]) / len(loss_history[-50:]):.3f}")

    test_epe = evaluate(model, test_frames, test_flow, config.eval_batch_size)
    zero_flow_epe = end_point_error(torch.zeros_like(test_flow), test_flow).item()
    metrics = {
        "test_epe": test_epe,
        "zero_flow_epe": zero_flow_epe,
        "ratio": test_epe / zero_flow_epe,
        "final_train_epe": sum(loss_history[-50:]) / len(loss_history[-50:]),
        "steps": config.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    common.save_checkpoint(out_dir / "checkpoint.pt", model, config, metrics)
    steps = list(range(1, config.steps + 1))
    common.plot_curves(out_dir / "curve.png",
                       {"train EPE (smoothed)": (steps, common.smoothed(loss_history)),
                        "zero-flow test EPE": (steps, [zero_flow_epe] * config.steps),
                        "final test EPE": (steps, [test_epe] * config.steps)},
                       "Perceiver IO optical flow", "end-point error (pixels)")
    return {**metrics, "loss_history": loss_history}


def main() -> None:
    common.run_example(NAME, "Perceiver IO optical flow on generated image pairs", DEFAULT, FULL, train)


if __name__ == "__main__":
    main()
