"""Byte-level masked language modelling: UTF-8 bytes in, a prediction per position out.

The corpus is the English documentation shipped with Python itself (pydoc's topic
texts, pydoc_data.topics: about 466 kB). Sequences of bytes are embedded with learned
positions; 15% of the positions are replaced by a mask token and the model predicts
the original bytes there. As the paper does for large outputs, the decoder is only
asked for the masked positions (subsampled decoding). The score is the masked-byte
accuracy on held-out topics, against the unigram baseline (always predicting the
most frequent byte, a space). No downloads.

    python -m examples.text_mlm           # CPU default, a few minutes
    python -m examples.text_mlm --full    # longer sequences, bigger model (GPU)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

import perceiver
from perceiver.adapters import EmbeddingDecoderOutputAdapter, TokenInputAdapter

from . import common

MASK_TOKEN = 256
VOCAB_SIZE = 257  # 256 byte values and the mask token


@dataclasses.dataclass(frozen=True)
class TextConfig:
    # Small and long beats wide and short on a CPU budget: many cheap steps teach the
    # local byte statistics that most of the accuracy comes from.
    steps: int = 8000
    batch_size: int = 32
    seq_len: int = 64
    mask_fraction: float = 0.15
    lr: float = 2e-3
    weight_decay: float = 0.01
    channels: int = 64
    num_latents: int = 32
    latent_dim: int = 64
    num_layers: int = 4
    num_heads: int = 4
    test_fraction: float = 0.1


DEFAULT = TextConfig()
FULL = TextConfig(steps=30000, batch_size=128, seq_len=512, channels=256, num_latents=128, latent_dim=512,
                  num_layers=6, num_heads=8, lr=5e-4)


def load_corpus(test_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, test bytes) as uint8 tensors, split by topic so test text is unseen."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(1234)).tolist()
    test_count = max(1, int(len(names) * test_fraction))
    test_names = {names[i] for i in order[:test_count]}

    def join(selected):
        data = "\n\n".join(topics[name] for name in names if (name in test_names) == selected).encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    return join(False), join(True)


def build_model(config: TextConfig) -> perceiver.PerceiverIO:
    tokens = TokenInputAdapter(VOCAB_SIZE, config.channels, config.seq_len)
    d = config.latent_dim
    return perceiver.PerceiverIO(
        encoder=perceiver.PerceiverEncoder(config.channels, config.num_latents, d),
        processor=perceiver.PerceiverProcessor(d, num_layers_per_block=config.num_layers, num_heads=config.num_heads),
        decoder=perceiver.PerceiverDecoder(query_dim=config.channels, latent_dim=d, num_heads=config.num_heads,
                                           qk_channels=d, v_channels=config.channels),
        queries=perceiver.TrainablePositionEncoding(config.seq_len, config.channels),
        input_adapter=tokens,
        output_adapter=EmbeddingDecoderOutputAdapter(tokens.embeddings),
    )


def sample_batch(corpus: torch.Tensor, config: TextConfig, generator: torch.Generator):
    """Token ids (B, L) with one shared random set of masked positions, the positions and the true bytes.

    Sharing the masked positions across the batch lets the decoder run only on them.
    """
    starts = torch.randint(0, len(corpus) - config.seq_len, (config.batch_size,), generator=generator)
    original = torch.stack([corpus[s:s + config.seq_len] for s in starts.tolist()]).long()
    count = max(1, int(config.seq_len * config.mask_fraction))
    positions = torch.randperm(config.seq_len, generator=generator)[:count].sort().values
    masked = original.clone()
    masked[:, positions] = MASK_TOKEN
    return masked, positions, original[:, positions]


def evaluate(model, corpus: torch.Tensor, config: TextConfig, device, batches: int = 40) -> tuple[float, float]:
    """(masked-byte accuracy, unigram baseline) on fixed random batches of `corpus`."""
    generator = torch.Generator().manual_seed(99)
    most_frequent = torch.bincount(corpus.long(), minlength=256).argmax()
    correct = baseline = total = 0
    model.eval()
    with torch.no_grad():
        for _ in range(batches):
            masked, positions, targets = sample_batch(corpus, config, generator)
            logits = model(masked.to(device), index=positions.to(device))
            correct += (logits.argmax(-1).cpu() == targets).sum().item()
            baseline += (targets == most_frequent).sum().item()
            total += targets.numel()
    return correct / total, baseline / total


def train(config: TextConfig, out_dir: Path, device, seed: int = 0, show_progress: bool = True) -> dict:
    torch.manual_seed(seed)
    device = torch.device(device)
    train_corpus, test_corpus = load_corpus(config.test_fraction)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    steps = range(config.steps)
    model.train()
    for _ in (common.progress(steps, config.steps, "text_mlm") if show_progress else steps):
        masked, positions, targets = sample_batch(train_corpus, config, generator)
        logits = model(masked.to(device), index=positions.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    test_accuracy, unigram = evaluate(model, test_corpus, config, device)
    metrics = {
        "masked_byte_accuracy": test_accuracy,
        "unigram_baseline": unigram,
        "ratio_to_baseline": test_accuracy / unigram,
        "train_bytes": len(train_corpus),
        "test_bytes": len(test_corpus),
        "loss_history": losses,
    }
    printable = {k: v for k, v in metrics.items() if k != "loss_history"}
    common.save_checkpoint(out_dir / "checkpoint.pt", model, config, printable)
    common.plot_curves(out_dir / "curve.png", {"training loss (smoothed)": (list(range(len(losses))),
                                                                           common.smoothed(losses))},
                       "Byte-level masked LM on pydoc topics", "cross-entropy (masked bytes)")
    return metrics


def main() -> None:
    common.run_example("text_mlm", __doc__, DEFAULT, FULL, train)


if __name__ == "__main__":
    main()
