"""The `model` suite: end-to-end Perceiver IO, this package against HF transformers and perceiver-pytorch.

The workload is image classification from raw pixels + Fourier features (HF
PerceiverForImageClassificationFourier). This package's model is converted from the HF
model with perceiver.from_hf, so both compute the same function with the same
weights; perceiver-pytorch's PerceiverIO is built with the same sizes (its own
architecture and weights: inputs of the same width, the same latents, depth and
heads). Inference (no grad) and a training step (forward + backward) are timed, the
three models interleaved. A comparison package that is not installed gets a row that
says so (the GPU machine has no perceiver-pytorch).

Optical flow (issue 16): HF PerceiverForOpticalFlow and its conversion, inference on two
frames of 3x3 RGB patches; ours decodes its one query per pixel (182,528 at the released
368 x 496) `chunk_size` at a time, so that the decoder's activations stay bounded, and
the rows record each model's peak memory.

Perceiver AR (issue 17): a training step of perceiver.PerceiverAR against PlainPerceiverAR,
the same model in plain PyTorch (same parameters, loaded from its state dict; attention
as explicit matmuls and softmax under the causal mask, rotary embeddings as complex
multiplication), and generation with the key/value cache against generate(use_cache=False),
which recomputes the whole forward for every token. A generation call makes
`new_tokens` tokens after a prompt filling the rest of the context; both providers pay
one full forward for the first token.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import perceiver
from perceiver.padding import stored_head_dims

from . import flops
from .harness import measure_case, throughput

GENERATION_BASELINE = "perceiver_kernels, no cache"
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


def _hf_and_converted(make: Callable[[Any], nn.Module]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """HF's model, made by make(transformers), and its conversion by perceiver.from_hf
    (same weights), or no models and why not."""
    try:
        import transformers
    except ImportError:
        reason = "not installed: transformers (this package's model is converted from HF's)"
        return {}, {"perceiver_kernels": reason, "hf_transformers": reason}
    hf_model = make(transformers)
    return {"perceiver_kernels": perceiver.from_hf(hf_model), "hf_transformers": hf_model}, {}


def build_models(config: ModelConfig) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """(the models that can be built, {provider: why not} for the others)."""
    models, missing = _hf_and_converted(lambda transformers: transformers.PerceiverForImageClassificationFourier(
        transformers.PerceiverConfig(
            image_size=config.image_size, num_latents=config.num_latents, d_latents=config.d_latents,
            d_model=FOURIER_CHANNELS, num_blocks=config.num_blocks,
            num_self_attends_per_block=config.num_self_attends_per_block,
            num_self_attention_heads=config.num_self_attention_heads, num_cross_attention_heads=1,
            num_labels=config.num_labels,
        )))
    if missing:
        return models, missing
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


def _sized(device: torch.device, size: str, gpu, cpu, cpu_full):
    """A case's configuration: the GPU's, else the CPU's at the run's size."""
    if device.type == "cuda":
        return gpu
    return cpu_full if size == "full" else cpu


def config_for(device: torch.device, size: str) -> ModelConfig:
    return _sized(device, size, GPU_CONFIG, CPU_CONFIG, CPU_FULL)


def _precision(device: torch.device):
    """(dtype, autocast context): bf16 autocast on a GPU, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16, torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext()


def _time_models(models: dict[str, nn.Module], call: Callable[[str, nn.Module], torch.Tensor],
                 device: torch.device, autocast, training: bool) -> dict[str, dict]:
    """measure_case of call(name, model) for every model, interleaved; a training step
    adds the backward of a loss on the output (gradients written afresh every call)."""
    def step(name, model):
        with autocast, torch.set_grad_enabled(training):
            out = call(name, model)
            if training:
                model.zero_grad(set_to_none=True)  # every call writes fresh gradients, none accumulates
                out.float().square().mean().backward()
            return out

    for model in models.values():
        model.train(training)
    return measure_case({name: functools.partial(step, name, model) for name, model in models.items()}, device)


def _model_rows(common: dict, providers: tuple[str, ...], results: dict[str, dict], missing: dict[str, str],
                case_flops: int, batch: int) -> list[dict]:
    """A row per provider: its figures and throughput, or why it did not run."""
    rows = []
    for name in providers:
        row = {**common, "provider": name, "batch": batch, "flops": case_flops,
               **results.get(name, {"status": missing.get(name, "not run")})}
        if row["status"] == "ok":
            row["tflops"] = throughput(case_flops, row["median_ms"])
            row["samples_per_s"] = batch / (row["median_ms"] * 1e-3)
        rows.append(row)
    return rows


PASSES = (("inference", False), ("training step", True))
FLOW_PASS = "optical flow inference"
AR_PASSES = ("Perceiver AR training step", "Perceiver AR generation")


def cases(device: torch.device, size: str) -> list[str]:
    """The passes measured (each times every model interleaved)."""
    return [name for name, _ in PASSES] + [FLOW_PASS] + list(AR_PASSES)


def run_suite(device: torch.device, size: str, ceilings: dict, progress: Callable[[str], None],
              rows: Optional[list] = None) -> list[dict]:
    """Measures every case; appends each row to `rows` (a new list by default) as it is
    measured, so that a stopped run keeps what it measured, and returns it."""
    config = config_for(device, size)
    dtype, autocast = _precision(device)
    torch.manual_seed(0)
    models, missing = build_models(config)
    models = {name: model.to(device) for name, model in models.items()}
    pixels = torch.randn(config.batch, 3, config.image_size, config.image_size, device=device)
    features = torch.randn(config.batch, config.image_size**2, FOURIER_CHANNELS, device=device)
    queries = torch.randn(config.batch, 1, config.d_latents, device=device)
    forward_flops = model_flops(config)
    case = f"{config.image_size}x{config.image_size} Fourier classifier"
    rows = [] if rows is None else rows
    for pass_name, training in PASSES:
        progress(f"model {pass_name}")
        results = _time_models(models, lambda name, model: _call(name, model, pixels, features, queries), device,
                               autocast, training)
        case_flops = int(forward_flops * (1 + 2 * training))  # backward of dense layers: 2x forward
        common = {"suite": "model", "case": case, "pass": pass_name, "dtype": str(dtype).replace("torch.", "")}
        rows += _model_rows(common, ("perceiver_kernels", "hf_transformers", "perceiver_pytorch"), results, missing,
                            case_flops, config.batch)
    del models
    flow_rows(device, size, progress, rows)
    return perceiver_ar_rows(device, size, progress, rows)


PATCH_CHANNELS = 54  # two frames of 3x3 patches of RGB pixels, concatenated per pixel
PATCH_FEATURES = 64  # HF's Linear on them (conv_after_patching)
FLOW_CHANNELS = PATCH_FEATURES + 2 + 2 * 2 * 64  # + Fourier features: 2 positions, 2 x 2 x 64 bands (322)


@dataclass(frozen=True)
class FlowConfig:
    height: int
    width: int
    num_latents: int
    d_latents: int
    num_self_attends_per_block: int
    num_self_attention_heads: int
    chunk_size: int  # the output queries ours decodes at a time
    batch: int = 1


FLOW_CPU = FlowConfig(height=16, width=24, num_latents=32, d_latents=64, num_self_attends_per_block=2,
                      num_self_attention_heads=4, chunk_size=128)
FLOW_CPU_FULL = FlowConfig(height=32, width=48, num_latents=64, d_latents=128, num_self_attends_per_block=4,
                           num_self_attention_heads=4, chunk_size=512)
# The released deepmind/optical-flow-perceiver (HF's conversion): train_size 368 x 496,
# 2,048 latents of 512, one block of 24 self-attention layers with 16 heads, one-head
# cross-attentions, widening factors 1. Its decoder has one query per pixel: 182,528.
# Chunks of 2^15 queries: each still launches at least 256 query tiles (at 128 rows a
# tile; about two waves over the H200's 132 SMs), and 6 chunks' few extra launches
# cost little; a chunk's layer activations (its 322-wide queries, their 512-wide
# projections, the MLP: at most ~9 KB a query in bf16/fp32 under autocast, ~0.3 GB)
# stay below what the encoder already holds for the 182,528 inputs (adapted inputs,
# their norm, keys and values: ~0.7 GB), where a whole decode could hold ~1.7 GB at
# once. Ours fuses the attention (no 182,528 x 2,048 scores); HF materialises them, in
# both cross-attentions.
# Time in gpu_run.sh: an HF call should take tens of ms; even at 1 s, 2 untimed calls
# per model and the GPU discipline's 10 rounds (then its 1.5 s budget ends the case)
# come to ~15 s besides building the models: no cap needed.
FLOW_GPU = FlowConfig(height=368, width=496, num_latents=2048, d_latents=512, num_self_attends_per_block=24,
                      num_self_attention_heads=16, chunk_size=2**15)


def flow_config_for(device: torch.device, size: str) -> FlowConfig:
    return _sized(device, size, FLOW_GPU, FLOW_CPU, FLOW_CPU_FULL)


def flow_case(config: FlowConfig) -> str:
    return f"{config.height}x{config.width} optical flow"


def build_flow_models(config: FlowConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """HF PerceiverForOpticalFlow (random weights) and its conversion, or why not."""
    return _hf_and_converted(lambda transformers: transformers.PerceiverForOpticalFlow(transformers.PerceiverConfig(
        train_size=[config.height, config.width], num_latents=config.num_latents, d_latents=config.d_latents,
        d_model=FLOW_CHANNELS, num_blocks=1, num_self_attends_per_block=config.num_self_attends_per_block,
        num_self_attention_heads=config.num_self_attention_heads, num_cross_attention_heads=1,
    )))


def flow_inputs(config: FlowConfig, device: torch.device) -> torch.Tensor:
    """What HF's flow model takes: (B, 2 frames, 27 = 3x3 patches of RGB, H, W)."""
    return torch.randn(config.batch, 2, PATCH_CHANNELS // 2, config.height, config.width, device=device)


def flow_call(frames: torch.Tensor, chunk_size: int, name: str, model: nn.Module) -> torch.Tensor:
    """The flow (B, H, W, 2); ours decodes chunk_size queries at a time."""
    if name == "hf_transformers":
        return model(inputs=frames).logits
    return model(frames, chunk_size=chunk_size)


def flow_flops(config: FlowConfig, stored_heads: bool = False) -> int:
    """Forward FLOPs of HF's flow model, the throughput figures' count for both models;
    stored_heads: those our conversion computes, its 322-channel encoder head stored as
    336 (perceiver/padding.py)."""
    b, n, d, m = config.batch, config.num_latents, config.d_latents, config.height * config.width
    patches = flops.linear(b * m, PATCH_CHANNELS, PATCH_FEATURES)
    head = stored_head_dims(FLOW_CHANNELS, FLOW_CHANNELS)[0] if stored_heads else FLOW_CHANNELS
    encoder = flops.perceiver_layer(b, n, m, d, FLOW_CHANNELS, head, head, 1, 1)
    layer = flops.perceiver_layer(b, n, n, d, d, d, d, config.num_self_attention_heads, 1)
    decoder = flops.perceiver_layer(b, m, n, FLOW_CHANNELS, d, d, d, 1, 1) + flops.linear(b * m, FLOW_CHANNELS, 2)
    return patches + encoder + config.num_self_attends_per_block * layer + decoder


def flow_rows(device: torch.device, size: str, progress: Callable[[str], None],
              rows: Optional[list] = None) -> list[dict]:
    """Optical flow inference, ours (chunked decode) against HF; appends to `rows` as run_suite does."""
    progress(FLOW_PASS)
    config = flow_config_for(device, size)
    dtype, autocast = _precision(device)
    torch.manual_seed(0)
    models, missing = build_flow_models(config)
    models = {name: model.to(device) for name, model in models.items()}
    frames = flow_inputs(config, device)
    rows = [] if rows is None else rows
    results = _time_models(models, functools.partial(flow_call, frames, config.chunk_size), device, autocast,
                           training=False)
    common = {"suite": "model", "case": flow_case(config), "pass": "inference",
              "dtype": str(dtype).replace("torch.", ""), "queries": config.height * config.width,
              "chunk_size": config.chunk_size}
    rows += _model_rows(common, ("perceiver_kernels", "hf_transformers"), results, missing, flow_flops(config),
                        config.batch)
    return rows


@dataclass(frozen=True)
class ARConfig:
    seq_len: int
    num_latents: int
    dim: int
    num_heads: int
    num_layers: int
    batch: int
    new_tokens: int  # per timed generation call
    vocab_size: int = 256
    widening_factor: int = 4


AR_CPU = ARConfig(seq_len=1024, num_latents=128, dim=128, num_heads=4, num_layers=2, batch=2, new_tokens=32)
AR_CPU_FULL = ARConfig(seq_len=4096, num_latents=256, dim=256, num_heads=4, num_layers=4, batch=2, new_tokens=64)
# The paper's shape: 1,024 latents over 8k positions. 32 new tokens keep the uncached
# generation (a full forward per token) within gpu_run.sh's time for the benchmark.
AR_GPU = ARConfig(seq_len=8192, num_latents=1024, dim=512, num_heads=8, num_layers=8, batch=4, new_tokens=32)


def ar_config_for(device: torch.device, size: str) -> ARConfig:
    return _sized(device, size, AR_GPU, AR_CPU, AR_CPU_FULL)


def ar_case(config: ARConfig) -> str:
    return f"Perceiver AR L={config.seq_len} N={config.num_latents}"


class _PlainAttention(nn.Module):
    """The parameters of perceiver.MultiHeadAttention, by the same names."""

    def __init__(self, dim: int, cross_attention: bool):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim) if cross_attention else nn.Identity()
        self.query, self.key, self.value, self.output = (nn.Linear(dim, dim) for _ in range(4))


class _PlainLayer(nn.Module):
    """The parameters of perceiver.PerceiverLayer, by the same names."""

    def __init__(self, dim: int, widening_factor: int, cross_attention: bool):
        super().__init__()
        self.attention = _PlainAttention(dim, cross_attention)
        self.layernorm = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.dense1 = nn.Linear(dim, widening_factor * dim)
        self.mlp.dense2 = nn.Linear(widening_factor * dim, dim)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp.dense2(F.gelu(self.mlp.dense1(self.layernorm(x))))


class PlainPerceiverAR(nn.Module):
    """perceiver.PerceiverAR (no padding, no dropout) in plain PyTorch; loads its state dict."""

    def __init__(self, config: ARConfig, rotary_base: float = 10_000.0):
        super().__init__()
        self.num_latents, self.num_heads = config.num_latents, config.num_heads
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.cross_attention = _PlainLayer(config.dim, config.widening_factor, cross_attention=True)
        self.layers = nn.ModuleList(_PlainLayer(config.dim, config.widening_factor, cross_attention=False)
                                    for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size)
        half = config.dim // config.num_heads // 2
        frequencies = rotary_base ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(config.seq_len, dtype=torch.float64)[:, None] * frequencies
        self.register_buffer("phases", torch.polar(torch.ones_like(angles), angles).to(torch.complex64),
                             persistent=False)

    def _heads(self, x: torch.Tensor, positions: Optional[slice]) -> torch.Tensor:
        """(B, L, dim) -> (B, H, L, D); with positions, rotary: channels i and i + D/2 of a
        head turned as one complex number by the phase of its position."""
        batch, length, dim = x.shape
        x = x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)
        if positions is None:
            return x
        half = x.shape[-1] // 2
        turned = torch.complex(x[..., :half].float(), x[..., half:].float()) * self.phases[positions]
        return torch.cat([turned.real, turned.imag], dim=-1).to(x.dtype)

    def _attention(self, layer: _PlainLayer, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The causal cross-attention layer: the latents are the last positions of the context."""
        attention = layer.attention
        length, count = context.shape[1], latents.shape[1]
        latent_positions = slice(length - count, length)
        q = self._heads(attention.query(attention.query_norm(latents)), latent_positions)
        context = attention.kv_norm(context)
        k = self._heads(attention.key(context), slice(0, length))
        v = self._heads(attention.value(context), None)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        # Latent i (position length - count + i) sees positions up to its own.
        hidden = torch.ones(count, length, dtype=torch.bool, device=q.device).triu(length - count + 1)
        weights = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        merged = (weights @ v).transpose(1, 2).flatten(2)
        return layer.mlp_block(latents + attention.output(merged))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> logits (B, num_latents, vocab_size), as PerceiverAR.forward."""
        embedded = self.embedding(tokens)
        latents = self._attention(self.cross_attention, embedded[:, -self.num_latents:], embedded)
        for layer in self.layers:
            latents = self._self_attention(layer, latents, tokens.shape[1])
        return self.head(self.norm(latents))

    def _self_attention(self, layer: _PlainLayer, latents: torch.Tensor, length: int) -> torch.Tensor:
        """Queries, keys and values all from the normalised latents, the last of `length` positions."""
        attention = layer.attention
        normed = attention.query_norm(latents)
        count = latents.shape[1]
        positions = slice(length - count, length)
        q = self._heads(attention.query(normed), positions)
        k = self._heads(attention.key(normed), positions)
        v = self._heads(attention.value(normed), None)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        hidden = torch.ones(count, count, dtype=torch.bool, device=q.device).triu(1)
        weights = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        merged = (weights @ v).transpose(1, 2).flatten(2)
        return layer.mlp_block(latents + attention.output(merged))


def build_perceiver_ar(config: ARConfig) -> tuple[perceiver.PerceiverAR, PlainPerceiverAR]:
    """PerceiverAR and its plain-PyTorch twin with the same weights."""
    ours = perceiver.PerceiverAR(config.vocab_size, config.seq_len, config.num_latents, config.dim,
                                 num_heads=config.num_heads, num_layers=config.num_layers,
                                 widening_factor=config.widening_factor)
    plain = PlainPerceiverAR(config)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def perceiver_ar_loss(model: nn.Module, windows: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Next-token cross-entropy of the latents; windows (B, L + 1) hold each input and the token after it."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, -num_latents:].flatten())


def perceiver_ar_flops(config: ARConfig) -> int:
    """Forward FLOPs of PerceiverAR: the attentions over the pairs their causal masks leave."""
    b, n, length, d, h = config.batch, config.num_latents, config.seq_len, config.dim, config.num_heads
    mlp = 2 * flops.linear(b * n, d, config.widening_factor * d)
    cross = (flops.linear(b * n, d, 2 * d) + flops.linear(b * length, d, 2 * d) + mlp
             + flops.attention(b, h, 1, n * (length - n) + n * (n + 1) // 2, d // h))
    layer = flops.linear(b * n, d, 4 * d) + mlp + flops.attention(b, h, 1, n * (n + 1) // 2, d // h)
    return cross + config.num_layers * layer + flops.linear(b * n, d, config.vocab_size)


def perceiver_ar_rows(device: torch.device, size: str, progress: Callable[[str], None],
                      rows: Optional[list] = None) -> list[dict]:
    """The Perceiver AR training step and generation; appends to `rows` as run_suite does."""
    config = ar_config_for(device, size)
    dtype, autocast = _precision(device)
    torch.manual_seed(0)
    ours, plain = (model.to(device) for model in build_perceiver_ar(config))
    windows = torch.randint(0, config.vocab_size, (config.batch, config.seq_len + 1), device=device)
    prompt = windows[:, :config.seq_len - config.new_tokens]
    case = ar_case(config)
    common = {"suite": "model", "case": case, "batch": config.batch, "dtype": str(dtype).replace("torch.", ""),
              "seq_len": config.seq_len, "num_latents": config.num_latents}
    rows = [] if rows is None else rows

    progress(AR_PASSES[0])

    def step(model):
        with autocast:
            model.zero_grad(set_to_none=True)
            perceiver_ar_loss(model, windows, config.num_latents).backward()

    step_flops = 3 * perceiver_ar_flops(config)  # backward of dense layers and attention: 2x forward
    results = measure_case({"perceiver_kernels": functools.partial(step, ours),
                            "plain_pytorch": functools.partial(step, plain)}, device)
    for name, result in results.items():
        row = {**common, "pass": "training step", "provider": name, "flops": step_flops, **result}
        if row["status"] == "ok":
            row["tflops"] = throughput(step_flops, row["median_ms"])
        rows.append(row)

    progress(AR_PASSES[1])
    ours.eval()

    def generate(use_cache):
        with autocast:
            return ours.generate(prompt, config.new_tokens, temperature=0, use_cache=use_cache)

    results = measure_case({"perceiver_kernels": functools.partial(generate, True),
                            GENERATION_BASELINE: functools.partial(generate, False)}, device)
    for name, result in results.items():
        row = {**common, "pass": "generation", "provider": name, "new_tokens": config.new_tokens, **result}
        if row["status"] == "ok":
            row["ms_per_token"] = row["median_ms"] / config.new_tokens
        rows.append(row)
    return rows
