"""The `model` suite: end-to-end Perceiver IO, this package against HF transformers and perceiver-pytorch.

The workload is image classification from raw pixels + Fourier features (HF
PerceiverForImageClassificationFourier). This package's model is converted from the HF
model with perceiver.from_hf, so both compute the same function with the same
weights; perceiver-pytorch's PerceiverIO is built with the same sizes (its own
architecture and weights: inputs of the same width, the same latents, depth and
heads). Inference (no grad) and a training step (forward + backward) are timed, the
three models interleaved. A comparison package that is not installed gets a row that
says so (the GPU machine has no perceiver-pytorch).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch

import perceiver

from . import flops
from .harness import measure_case, throughput

FOURIER_CHANNELS = 261  # 3 pixel channels + 2 positions + 2 x 2 x 64 Fourier bands


@dataclass(frozen=True)
class ModelConfig:
    image_size: int
    num_latents: int
    d_latents: int
    num_blocks: int
    num_self_attends_per_block: int
    num_self_attention_heads: int
    batch: int
    num_labels: int = 1000


CPU_CONFIG = ModelConfig(image_size=32, num_latents=64, d_latents=128, num_blocks=1, num_self_attends_per_block=2,
                         num_self_attention_heads=4, batch=2)
CPU_FULL = ModelConfig(image_size=64, num_latents=128, d_latents=256, num_blocks=2, num_self_attends_per_block=2,
                       num_self_attention_heads=4, batch=2)
# HF's default (the paper's ImageNet model): 224 x 224 pixels, 512 latents of 1024, 8 blocks of 6 layers.
GPU_CONFIG = ModelConfig(image_size=224, num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                         num_self_attention_heads=8, batch=8)


def model_flops(config: ModelConfig) -> int:
    """Forward FLOPs of the HF Fourier classifier (and of its conversion)."""
    b, n, d, m = config.batch, config.num_latents, config.d_latents, config.image_size**2
    encoder = flops.perceiver_layer(b, n, m, d, FOURIER_CHANNELS, FOURIER_CHANNELS, FOURIER_CHANNELS, 1, 1)
    layer = flops.perceiver_layer(b, n, n, d, d, d, d, config.num_self_attention_heads, 1)
    decoder = flops.perceiver_layer(b, 1, n, d, d, d, d, 1, 1) + flops.linear(b, d, config.num_labels)
    return encoder + config.num_blocks * config.num_self_attends_per_block * layer + decoder


def build_models(config: ModelConfig) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """(the models that can be built, {provider: why not} for the others)."""
    models: dict[str, torch.nn.Module] = {}
    missing: dict[str, str] = {}
    try:
        import transformers
    except ImportError:
        reason = "not installed: transformers (this package's model is converted from HF's)"
        return models, {"perceiver_kernels": reason, "hf_transformers": reason}
    hf_config = transformers.PerceiverConfig(
        image_size=config.image_size, num_latents=config.num_latents, d_latents=config.d_latents,
        d_model=FOURIER_CHANNELS, num_blocks=config.num_blocks,
        num_self_attends_per_block=config.num_self_attends_per_block,
        num_self_attention_heads=config.num_self_attention_heads, num_cross_attention_heads=1,
        num_labels=config.num_labels,
    )
    hf_model = transformers.PerceiverForImageClassificationFourier(hf_config)
    models["perceiver_kernels"] = perceiver.from_hf(hf_model)
    models["hf_transformers"] = hf_model
    try:
        from perceiver_pytorch import PerceiverIO as LucidrainsPerceiverIO
    except ImportError:
        missing["perceiver_pytorch"] = "not installed: perceiver-pytorch"
        return models, missing
    models["perceiver_pytorch"] = LucidrainsPerceiverIO(
        dim=FOURIER_CHANNELS, queries_dim=config.d_latents, logits_dim=config.num_labels,
        depth=config.num_blocks * config.num_self_attends_per_block, num_latents=config.num_latents,
        latent_dim=config.d_latents, cross_heads=1, latent_heads=config.num_self_attention_heads,
        cross_dim_head=FOURIER_CHANNELS, latent_dim_head=config.d_latents // config.num_self_attention_heads,
    )
    return models, missing


def _call(name: str, model: torch.nn.Module, pixels: torch.Tensor, features: torch.Tensor,
          queries: torch.Tensor) -> torch.Tensor:
    if name == "hf_transformers":
        return model(inputs=pixels).logits
    if name == "perceiver_pytorch":
        # Same input array as the others see after their pixel + Fourier preprocessing.
        return model(features, queries=queries)
    return model(pixels)


def config_for(device: torch.device, size: str) -> ModelConfig:
    if device.type == "cuda":
        return GPU_CONFIG
    return CPU_FULL if size == "full" else CPU_CONFIG


PASSES = (("inference", False), ("training step", True))


def cases(device: torch.device, size: str) -> list[str]:
    """The passes measured (each times every model interleaved)."""
    return [name for name, _ in PASSES]


def run_suite(device: torch.device, size: str, ceilings: dict, progress: Callable[[str], None]) -> list[dict]:
    config = config_for(device, size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = (torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext())
    torch.manual_seed(0)
    models, missing = build_models(config)
    models = {name: model.to(device) for name, model in models.items()}
    pixels = torch.randn(config.batch, 3, config.image_size, config.image_size, device=device)
    features = torch.randn(config.batch, config.image_size**2, FOURIER_CHANNELS, device=device)
    queries = torch.randn(config.batch, 1, config.d_latents, device=device)
    forward_flops = model_flops(config)
    case = f"{config.image_size}x{config.image_size} Fourier classifier"
    rows = []
    for pass_name, training in PASSES:
        progress(f"model {pass_name}")

        def step(name, model):
            with autocast, torch.set_grad_enabled(training):
                out = _call(name, model, pixels, features, queries)
                if training:
                    model.zero_grad(set_to_none=True)  # every call writes fresh gradients, none accumulates
                    out.float().square().mean().backward()
                return out

        for model in models.values():
            model.train(training)
        results = measure_case({name: functools.partial(step, name, model) for name, model in models.items()}, device)
        case_flops = int(forward_flops * (1 + 2 * training))  # backward of dense layers: 2x forward
        for name in ("perceiver_kernels", "hf_transformers", "perceiver_pytorch"):
            row = {"suite": "model", "case": case, "pass": pass_name, "provider": name, "batch": config.batch,
                   "dtype": str(dtype).replace("torch.", ""), "flops": case_flops,
                   **results.get(name, {"status": missing.get(name, "not run")})}
            if row["status"] == "ok":
                row["tflops"] = throughput(case_flops, row["median_ms"])
                row["samples_per_s"] = config.batch / (row["median_ms"] * 1e-3)
            rows.append(row)
    return rows
