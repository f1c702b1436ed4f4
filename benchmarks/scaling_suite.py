"""The `scaling` suite: cost against input size M for a Perceiver IO stack and a standard Transformer.

Both have the same width and depth: the Perceiver IO stack encodes M inputs into N
latents, processes them with `depth` self-attention layers and decodes M outputs
(queries = the inputs), so its cost is linear in M; nn.TransformerEncoder runs
depth + 2 layers of self-attention over all M tokens, quadratic in M. The two are
timed interleaved at each M, each up to the first size where it runs out of memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import perceiver

from . import flops
from .harness import measure_case, throughput


@dataclass(frozen=True)
class ScalingConfig:
    width: int
    heads: int
    num_latents: int
    depth: int
    sizes: tuple[int, ...]
    batch: int = 1


CPU_CONFIG = ScalingConfig(width=64, heads=4, num_latents=64, depth=2, sizes=(256, 512, 1024, 2048, 4096))
CPU_FULL = ScalingConfig(width=64, heads=4, num_latents=64, depth=2, sizes=(256, 512, 1024, 2048, 4096, 8192, 16384))
GPU_QUICK = ScalingConfig(width=256, heads=8, num_latents=256, depth=4, sizes=(1024, 4096, 16384, 65536))
GPU_FULL = ScalingConfig(width=256, heads=8, num_latents=256, depth=4,
                         sizes=(1024, 4096, 16384, 65536, 131072, 262144, 524288))


def config_for(device: torch.device, size: str) -> ScalingConfig:
    if device.type != "cuda":
        return CPU_FULL if size == "full" else CPU_CONFIG
    return GPU_FULL if size == "full" else GPU_QUICK


def perceiver_stack(config: ScalingConfig) -> perceiver.PerceiverIO:
    w = config.width
    return perceiver.PerceiverIO(
        encoder=perceiver.PerceiverEncoder(input_dim=w, num_latents=config.num_latents, latent_dim=w),
        processor=perceiver.PerceiverProcessor(w, num_layers_per_block=config.depth, num_heads=config.heads),
        decoder=perceiver.PerceiverDecoder(query_dim=w, latent_dim=w),
        queries=None,
    )


def perceiver_flops(config: ScalingConfig, size: int) -> int:
    w, b, n = config.width, config.batch, config.num_latents
    return (flops.perceiver_layer(b, n, size, w, w, w, w, 1, 1)
            + config.depth * flops.perceiver_layer(b, n, n, w, w, w, w, config.heads, 4)
            + flops.perceiver_layer(b, size, n, w, w, w, w, 1, 1))


def transformer(config: ScalingConfig) -> nn.Module:
    layer = nn.TransformerEncoderLayer(config.width, config.heads, dim_feedforward=4 * config.width,
                                       batch_first=True, norm_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=config.depth + 2, enable_nested_tensor=False)


def transformer_flops(config: ScalingConfig, size: int) -> int:
    layer = flops.transformer_encoder_layer(config.batch, size, config.width, config.heads, 4 * config.width)
    return (config.depth + 2) * layer


def cases(device: torch.device, size: str) -> list[int]:
    """The input sizes M measured (each times both models interleaved)."""
    return list(config_for(device, size).sizes)


def run_suite(device: torch.device, size: str, ceilings: dict, progress: Callable[[str], None],
              rows: Optional[list] = None) -> list[dict]:
    """Measures every case; appends each row to `rows` (a new list by default) as it is
    measured, so that a stopped run keeps what it measured, and returns it."""
    config = config_for(device, size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {
        "perceiver_io": (perceiver_stack(config).to(device=device, dtype=dtype).eval(), perceiver_flops),
        "transformer": (transformer(config).to(device=device, dtype=dtype).eval(), transformer_flops),
    }
    out_of_memory: set[str] = set()
    rows = [] if rows is None else rows
    for length in cases(device, size):
        progress(f"scaling M={length}")
        inputs = torch.randn(config.batch, length, config.width, device=device, dtype=dtype)

        def forward(model=None):
            with torch.no_grad():
                return model(inputs)

        calls = {name: functools.partial(forward, model) for name, (model, _) in models.items()
                 if name not in out_of_memory}
        results = measure_case(calls, device)
        for name, (_, count) in models.items():
            row = {"suite": "scaling", "case": f"M={length}", "M": length, "pass": "inference", "provider": name,
                   "width": config.width, "depth": config.depth, "num_latents": config.num_latents,
                   "dtype": str(dtype).replace("torch.", ""), "flops": count(config, length)}
            if name in out_of_memory:
                row["status"] = "out of memory (a smaller M already was)"
            else:
                row.update(results[name])
                if row["status"] == "ok":
                    row["tflops"] = throughput(row["flops"], row["median_ms"])
                elif row["status"] == "out of memory":
                    out_of_memory.add(name)
            rows.append(row)
        del inputs
    return rows
