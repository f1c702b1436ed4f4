"""Byte-level autoregressive language modelling with Perceiver AR.

The corpus is the one examples.text_mlm reads: the English documentation shipped with
Python itself (pydoc's topic texts), split by topic so that the test text is unseen.
The model reads windows of `seq_len` bytes; its last `num_latents` positions are the
latents, each predicting the byte after it. The score is bits per byte on the whole
held-out text (every byte after the first window's prefix, each predicted once with a
full window of context), against a unigram and a bigram model counted on the training
text (add-one unigram; Witten-Bell bigram, backing off to the unigram) and scored on
exactly the same held-out bytes. It ends by generating text from a held-out prompt,
once with the key/value cache and once recomputing the whole forward per byte, and
reports both speeds. No downloads.

    python -m examples.perceiver_ar           # CPU default, a few minutes
    python -m examples.perceiver_ar --full    # longer context, bigger model (GPU)
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import perceiver

from . import common
from .text_mlm import load_corpus

NAME = "perceiver_ar"
VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class ARConfig:
    steps: int = 800
    batch_size: int = 32
    seq_len: int = 256  # context bytes per training window, latents included
    num_latents: int = 64
    dim: int = 128
    num_heads: int = 4
    num_layers: int = 4
    widening_factor: int = 4
    dropout: float = 0.0
    context_dropout: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    test_fraction: float = 0.1
    eval_batch_size: int = 64
    prompt_bytes: int = 64
    temperature: float = 0.8
    top_k: int = 40


DEFAULT = ARConfig()
FULL = ARConfig(steps=20000, batch_size=64, seq_len=2048, num_latents=512, dim=512, num_heads=8, num_layers=8,
                dropout=0.1, context_dropout=0.25, lr=5e-4, prompt_bytes=512)


def build_model(config: ARConfig) -> perceiver.PerceiverAR:
    return perceiver.PerceiverAR(VOCAB_SIZE, config.seq_len, config.num_latents, config.dim,
                                 num_heads=config.num_heads, num_layers=config.num_layers,
                                 widening_factor=config.widening_factor, dropout=config.dropout,
                                 context_dropout=config.context_dropout)


def split(windows: torch.Tensor, config: ARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 bytes -> inputs (B, seq_len) and the byte after each latent (B, num_latents)."""
    return windows[:, :-1].long(), windows[:, config.seq_len - config.num_latents + 1:].long()


def sample_batch(corpus: torch.Tensor, config: ARConfig, generator: torch.Generator):
    starts = torch.randint(0, len(corpus) - config.seq_len, (config.batch_size,), generator=generator)
    return split(torch.stack([corpus[s:s + config.seq_len + 1] for s in starts.tolist()]), config)


def eval_windows(corpus: torch.Tensor, config: ARConfig) -> torch.Tensor:
    """Windows starting every num_latents bytes: their targets tile the corpus after the
    first window's prefix, so every held-out byte there is scored exactly once."""
    starts = range(0, len(corpus) - config.seq_len, config.num_latents)
    return torch.stack([corpus[s:s + config.seq_len + 1] for s in starts])


def byte_baselines(train_corpus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log2 probabilities from the training bytes: unigram (256,) with add-one smoothing,
    bigram (previous, next) (256, 256) with Witten-Bell interpolation with that unigram."""
    data = train_corpus.long()
    counts = torch.bincount(data, minlength=VOCAB_SIZE).double()
    unigram = (counts + 1) / (counts.sum() + VOCAB_SIZE)
    pairs = torch.zeros(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.float64)
    pairs.index_put_((data[:-1], data[1:]), torch.ones(len(data) - 1, dtype=torch.float64), accumulate=True)
    seen = pairs.sum(dim=1, keepdim=True)
    successors = (pairs > 0).sum(dim=1, keepdim=True).double()
    # A context never seen in training (seen = successors = 0) falls back to the unigram.
    bigram = torch.where(seen > 0, (pairs + successors * unigram) / (seen + successors).clamp_min(1), unigram)
    return unigram.log2(), bigram.log2()


def evaluate(model: perceiver.PerceiverAR, corpus: torch.Tensor, train_corpus: torch.Tensor, config: ARConfig,
             device) -> dict:
    """Bits per byte of the model and of the two baselines on the same held-out bytes."""
    unigram, bigram = byte_baselines(train_corpus)
    windows = eval_windows(corpus, config)
    model_bits = unigram_bits = bigram_bits = 0.0
    model.eval()
    with torch.no_grad():
        for batch in windows.split(config.eval_batch_size):
            inputs, targets = split(batch, config)
            logits = model(inputs.to(device))
            model_bits += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(device),
                                          reduction="sum").item() / math.log(2)
            previous = inputs[:, -config.num_latents:]
            unigram_bits -= unigram[targets].sum().item()
            bigram_bits -= bigram[previous, targets].sum().item()
    scored = windows.shape[0] * config.num_latents
    return {"bits_per_byte": model_bits / scored, "unigram_bits_per_byte": unigram_bits / scored,
            "bigram_bits_per_byte": bigram_bits / scored, "test_bytes_scored": scored}


def generation_speed(model: perceiver.PerceiverAR, prompt: torch.Tensor, new_bytes: int, config: ARConfig,
                     seed: int) -> tuple[torch.Tensor, dict]:
    """The sample generated with the cache, and ms per byte with and without it (same draws)."""
    model.eval()
    times = {}
    for use_cache in (True, False):
        generator = torch.Generator(prompt.device).manual_seed(seed)
        start = time.perf_counter()
        out = model.generate(prompt, new_bytes, temperature=config.temperature, top_k=config.top_k,
                             generator=generator, use_cache=use_cache)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize(prompt.device)
        times[use_cache] = (time.perf_counter() - start) / new_bytes * 1e3
        if use_cache:
            sample = out
    return sample, {"generate_ms_per_byte_cached": times[True], "generate_ms_per_byte_recomputed": times[False],
                    "generation_speedup": times[False] / times[True]}


def train(config: ARConfig, out_dir: Path, device, seed: int = 0, show_progress: bool = True) -> dict:
    torch.manual_seed(seed)
    device = torch.device(device)
    train_corpus, test_corpus = load_corpus(config.test_fraction)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps,
                                                   pct_start=config.warmup_fraction)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    steps = range(config.steps)
    model.train()
    for _ in (common.progress(steps, config.steps, NAME) if show_progress else steps):
        inputs, targets = sample_batch(train_corpus, config, generator)
        logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item() / math.log(2))  # bits per byte
    metrics = evaluate(model, test_corpus, train_corpus, config, device)
    metrics["vs_bigram"] = metrics["bits_per_byte"] / metrics["bigram_bits_per_byte"]
    prompt = test_corpus[:config.prompt_bytes].long()[None].to(device)
    sample, speed = generation_speed(model, prompt, config.seq_len - config.prompt_bytes, config, seed)
    metrics.update(speed)
    text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
    (out_dir / "sample.txt").write_text(text)
    print(f"--- generated after a {config.prompt_bytes}-byte held-out prompt ---\n{text}\n---")
    metrics.update(train_bytes=len(train_corpus), test_bytes=len(test_corpus), loss_history=losses)
    printable = {k: v for k, v in metrics.items() if k != "loss_history"}
    common.save_checkpoint(out_dir / "checkpoint.pt", model, config, printable)
    steps_axis = list(range(len(losses)))
    common.plot_curves(out_dir / "curve.png", {
        "training loss (smoothed)": (steps_axis, common.smoothed(losses)),
        "bigram, held-out": (steps_axis, [metrics["bigram_bits_per_byte"]] * len(losses)),
        "Perceiver AR, held-out": (steps_axis, [metrics["bits_per_byte"]] * len(losses)),
    }, "Byte-level Perceiver AR on pydoc topics", "bits per byte")
    return metrics


def main() -> None:
    common.run_example(NAME, __doc__, DEFAULT, FULL, train)


if __name__ == "__main__":
    main()
