"""Image classification from raw pixels + Fourier features, with one learned query.

The handwritten digits that ship with scikit-learn (1797 images of 8 x 8 pixels,
10 classes): each pixel is an input (its grey value and the Fourier features of its
position), latents cross-attend to the 64 pixels, a single learned query reads the
class out of the latents. No downloads.

    python -m examples.digits           # CPU default, about a minute
    python -m examples.digits --full    # wider and longer (GPU)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

import perceiver
from perceiver.adapters import ClassificationOutputAdapter, GridFourierEncoding, ImageInputAdapter

from . import common


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    num_bands: int = 4
    num_latents: int = 32
    latent_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    test_fraction: float = 0.2


DEFAULT = DigitsConfig()
FULL = DigitsConfig(steps=6000, batch_size=128, num_latents=64, latent_dim=128, num_layers=4)
NUM_CLASSES = 10


def load_digits(test_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images (N, 1, 8, 8) in [0, 1], train labels, test images, test labels), a fixed split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    test = int(len(labels) * test_fraction)
    return images[order[test:]], labels[order[test:]], images[order[:test]], labels[order[:test]]


def build_model(config: DigitsConfig) -> perceiver.PerceiverIO:
    adapter = ImageInputAdapter("pixels", GridFourierEncoding(config.num_bands, (8, 8)), in_channels=1)
    d = config.latent_dim
    return perceiver.PerceiverIO(
        encoder=perceiver.PerceiverEncoder(adapter.num_channels, config.num_latents, d),
        processor=perceiver.PerceiverProcessor(d, num_layers_per_block=config.num_layers, num_heads=config.num_heads),
        decoder=perceiver.PerceiverDecoder(query_dim=d, latent_dim=d, num_heads=1),
        queries=perceiver.TrainablePositionEncoding(1, d),
        input_adapter=adapter,
        output_adapter=ClassificationOutputAdapter(d, NUM_CLASSES),
    )


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk.to(device)).argmax(-1).cpu() for chunk in images.split(512)])
    return (predictions == labels).float().mean().item()


def train(config: DigitsConfig, out_dir: Path, device, seed: int = 0, show_progress: bool = True) -> dict:
    torch.manual_seed(seed)
    device = torch.device(device)
    train_images, train_labels, test_images, test_labels = load_digits(config.test_fraction)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    losses = []
    steps = range(config.steps)
    for _ in (common.progress(steps, config.steps, "digits") if show_progress else steps):
        model.train()
        batch = torch.randint(0, len(train_labels), (config.batch_size,))
        loss = F.cross_entropy(model(train_images[batch].to(device)), train_labels[batch].to(device),
                               label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    metrics = {
        "test_accuracy": accuracy(model, test_images, test_labels, device),
        "train_accuracy": accuracy(model, train_images, train_labels, device),
        "chance": 1 / NUM_CLASSES,
        "test_images": len(test_labels),
        "loss_history": losses,
    }
    printable = {k: v for k, v in metrics.items() if k != "loss_history"}
    common.save_checkpoint(out_dir / "checkpoint.pt", model, config, printable)
    common.plot_curves(out_dir / "curve.png", {"training loss (smoothed)": (list(range(len(losses))),
                                                                           common.smoothed(losses))},
                       "Perceiver IO on scikit-learn digits", "cross-entropy")
    return metrics


def main() -> None:
    common.run_example("digits", __doc__, DEFAULT, FULL, train)


if __name__ == "__main__":
    main()
