"""The `op` suite: cross_attention forward, and forward+backward, against naive attention
and each SDPA backend.

Shapes are the Perceiver IO anchors of the project's roofline table (ENC-1..4,
DEC-1..2), with and without a key padding mask (a mask forces SDPA onto a kernel
that never splits the keys), and two forward sweeps: ENCODE over the number of
inputs M and DECODE over the number of outputs O. The CPU runs scaled-down versions
(larger ones with --size full). A masked case pads the last PAD_FRACTION of the keys
of every batch element, as variable-length inputs padded to one length do.

Perceiver AR's attentions (issue 17) come in pairs, each with and without the causal
mask on the same shape: the cross-attention of 1,024 latents over 8k and 64k context
positions ("AR-8k", "AR-64k") and the latents' self-attention ("AR-1k self"). The
mask is aligned at the bottom right (query i sees keys j <= i + Nk - Nq); our op gets
causal=True, SDPA the lower-right causal bias (a backend that refuses it gets a row
saying so), naive attention the reference's mask. Over 8k keys the mask hides only
the last 1,024 x 1,024 triangle (1/16 of the scores), so a causal kernel can save
about half the work only on the square self-attention; FLOPs count the scores the
mask leaves visible.

A residual case ("DEC-1 residual") times the output plus a residual of its shape: our
op adds it in the kernel's epilogue, SDPA and naive attention add it after. Wide-head
cases (issue 16) are the released models' one-head cross-attentions: the image
classifier's 512 latents over 50,176 inputs of 261 (Fourier) or 322 (learned
position) channels, and optical flow's 182,528 output queries over 2,048 latents of
512 channels; SDPA's flash backend refuses heads over 256 (its row says so).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import perceiver_kernels as pk
from perceiver_kernels.triton import variants

from torch.nn.attention.bias import causal_lower_right

from .flops import BACKWARD_FACTOR
from .flops import attention as attention_flops
from .harness import measure_case, throughput
from .targets import UNTIMED


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    num_queries: int
    num_keys: int
    head_dim: int
    pad_fraction: float = 0.0  # of the keys of every batch element, padded at the end
    sweep: str = ""  # "encode" or "decode": a point of that sweep, plotted against its long side
    causal: bool = False  # bottom-right aligned, as Perceiver AR's latents over their context
    residual: bool = False  # out + a residual of out's shape (fused in our kernels' epilogue)

    def __post_init__(self):
        if self.causal and self.masked:
            raise ValueError(f"shape {self.name!r}: a causal case of this suite takes no key padding "
                             "(SDPA's causal bias does not combine with a mask)")

    @property
    def masked(self) -> bool:
        return self.pad_fraction > 0

    @property
    def padded_keys(self) -> int:
        """Padding keys per batch element."""
        return round(self.pad_fraction * self.num_keys)

    @property
    def visible_pairs(self) -> int:
        """(query, key) pairs whose scores count: all, or those the causal mask leaves.

        Causal: the last r = min(Nq, Nk) queries see keys (the first Nq - r see none);
        the k-th of them sees Nk - r + k + 1."""
        if not self.causal:
            return self.num_queries * self.num_keys
        seeing = min(self.num_queries, self.num_keys)
        return seeing * (self.num_keys - seeing) + seeing * (seeing + 1) // 2

    def flops(self, backward: bool) -> int:
        """The forward's count over the visible pairs, plus BACKWARD_FACTOR times it for the backward."""
        full = attention_flops(self.batch, self.heads, self.num_queries, self.num_keys, self.head_dim)
        forward = full * self.visible_pairs // (self.num_queries * self.num_keys)
        return int(forward * (1 + BACKWARD_FACTOR)) if backward else forward

    def min_bytes(self, element_size: int, backward: bool) -> int:
        """The roofline's traffic: the forward reads q, k, v and writes out once; the
        backward reads q, k, v, out, dout and writes dq, dk, dv once."""
        rows = 2 * self.num_queries + 2 * self.num_keys + (self.num_queries if self.residual else 0)
        if backward:
            rows += 4 * self.num_queries + 4 * self.num_keys
        return self.batch * self.heads * rows * self.head_dim * element_size


PAD_FRACTION = 0.25


def causal_pair(name: str, *sizes: int) -> list[Shape]:
    """The same shape without and with the causal mask ("<name>", "<name> causal")."""
    return [Shape(name, *sizes), Shape(f"{name} causal", *sizes, causal=True)]


GPU_SHAPES = [
    Shape("ENC-1", 8, 8, 256, 50_176, 64),
    Shape("ENC-1 masked", 8, 8, 256, 50_176, 64, pad_fraction=PAD_FRACTION),
    Shape("ENC-2", 1, 16, 2048, 182_528, 64),
    Shape("ENC-3", 1, 8, 256, 400_000, 64),
    Shape("ENC-3 masked", 1, 8, 256, 400_000, 64, pad_fraction=PAD_FRACTION),
    Shape("ENC-4", 8, 8, 256, 50_176, 32),
    Shape("DEC-1", 8, 8, 50_176, 256, 64),
    Shape("DEC-2", 1, 8, 800_000, 2048, 64),
    Shape("DEC-1 residual", 8, 8, 50_176, 256, 64, residual=True),
    Shape("ENC-1 d128", 8, 8, 256, 50_176, 128),
    Shape("DEC-1 d32", 8, 8, 50_176, 256, 32),
    Shape("DEC-1 d128", 8, 8, 50_176, 256, 128),
    Shape("IMG-261", 8, 1, 512, 50_176, 261),
    Shape("IMG-322", 8, 1, 512, 50_176, 322),
    Shape("FLOW-512 decode", 1, 1, 182_528, 2048, 512),
    *causal_pair("AR-8k", 4, 8, 1024, 8192, 64),
    *causal_pair("AR-64k", 1, 8, 1024, 65_536, 64),
    *causal_pair("AR-1k self", 8, 8, 1024, 1024, 64),
]
# One CPU core runs these in a few minutes in all (quick) or about a quarter of an hour (full).
CPU_SHAPES = [
    Shape("ENC small", 1, 4, 64, 16_384, 64),
    Shape("ENC small masked", 1, 4, 64, 16_384, 64, pad_fraction=PAD_FRACTION),
    Shape("DEC small", 1, 4, 16_384, 64, 64),
    Shape("DEC small residual", 1, 4, 16_384, 64, 64, residual=True),
    *causal_pair("AR small", 1, 4, 128, 2048, 64),
]
CPU_SHAPES_FULL = [
    Shape("ENC medium", 1, 8, 128, 65_536, 64),
    Shape("ENC medium masked", 1, 8, 128, 65_536, 64, pad_fraction=PAD_FRACTION),
    Shape("DEC medium", 1, 8, 65_536, 128, 64),
    *causal_pair("AR medium", 1, 8, 256, 8192, 64),
]
AR_QUICK = ("AR-8k", "AR-8k causal", "AR-1k self", "AR-1k self causal")
WIDE_GPU = ("IMG-261", "IMG-322", "FLOW-512 decode")
QUICK_GPU = ("ENC-1", "ENC-3", "ENC-3 masked", "DEC-1", "DEC-1 residual", "ENC-1 d128", *AR_QUICK, *WIDE_GPU)
BACKWARD_GPU = ("ENC-1", "ENC-3", "ENC-3 masked", "DEC-1", "DEC-1 residual", *AR_QUICK, "AR-64k", "AR-64k causal",
                *WIDE_GPU)


def sweep_shapes(batch: int, heads: int, short_side: int, long_sides: tuple[int, ...], head_dim: int) -> list[Shape]:
    """ENCODE (short_side latents over M inputs) and DECODE (O outputs over short_side latents)."""
    return ([Shape(f"ENC M={m}", batch, heads, short_side, m, head_dim, sweep="encode") for m in long_sides]
            + [Shape(f"DEC O={o}", batch, heads, o, short_side, head_dim, sweep="decode") for o in long_sides])


GPU_SWEEP = sweep_shapes(1, 8, 256, (4096, 16_384, 65_536, 262_144, 1_048_576), 64)  # full size only
CPU_SWEEP = sweep_shapes(1, 4, 64, (1024, 4096, 16_384), 64)
CPU_SWEEP_FULL = sweep_shapes(1, 8, 128, (1024, 4096, 16_384, 65_536), 64)


def cases(device: torch.device, size: str) -> list[tuple[Shape, bool]]:
    """(shape, with backward) of every measured pass: the anchors forward, the backward
    where it is measured, then the forward sweeps; only the cases named in BENCH_OP_CASES
    (comma-separated) where it is set, for a short GPU run."""
    if device.type != "cuda":
        shapes, sweep = (CPU_SHAPES_FULL, CPU_SWEEP_FULL) if size == "full" else (CPU_SHAPES, CPU_SWEEP)
        every = [(s, False) for s in shapes] + [(s, True) for s in shapes] + [(s, False) for s in sweep]
    else:
        shapes = GPU_SHAPES if size == "full" else [s for s in GPU_SHAPES if s.name in QUICK_GPU]
        sweep = GPU_SWEEP if size == "full" else []
        every = ([(s, False) for s in shapes] + [(s, True) for s in shapes if s.name in BACKWARD_GPU]
                 + [(s, False) for s in sweep])
    named = [name.strip() for name in os.environ.get("BENCH_OP_CASES", "").split(",") if name.strip()]
    unknown = sorted(set(named) - {shape.name for shape, _ in every})
    if unknown:
        raise ValueError(f"BENCH_OP_CASES names no case of this size and device: {', '.join(unknown)}")
    return [(shape, backward) for shape, backward in every if not named or shape.name in named]


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(length):
        return torch.randn(shape.batch, shape.heads, length, shape.head_dim, device=device, dtype=dtype,
                           generator=generator)

    mask = None
    if shape.masked:
        keys = torch.arange(shape.num_keys, device=device)
        mask = (keys >= shape.num_keys - shape.padded_keys).expand(shape.batch, -1).contiguous()
    q, k, v = randn(shape.num_queries), randn(shape.num_keys), randn(shape.num_keys)
    return {"q": q, "k": k, "v": v, "mask": mask, "causal": shape.causal,
            "residual": randn(shape.num_queries) if shape.residual else None}


def _sdpa(backend_name: Optional[str]) -> Callable[[dict], torch.Tensor]:
    def run(inputs):
        attn_mask = None if inputs["mask"] is None else ~inputs["mask"][:, None, None, :]
        if inputs["causal"]:
            attn_mask = causal_lower_right(inputs["q"].shape[2], inputs["k"].shape[2])
        context = contextlib.nullcontext()
        if backend_name is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            context = sdpa_kernel(getattr(SDPBackend, backend_name))
        with context:
            out = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=attn_mask)
        return out if inputs["residual"] is None else out + inputs["residual"]

    return run


# Our providers and the backend each runs: "auto" as users get it, and on a GPU each
# kernel backend explicitly (the kernel targets are the Triton backend's; auto does
# not choose the CUDA C++ kernels yet).
OUR_BACKENDS = {"perceiver_kernels": "auto", "perceiver_kernels[triton]": "triton", "perceiver_kernels[cuda]": "cuda",
                UNTIMED: "triton"}
# The Triton rewrites no GPU has timed yet (perceiver_kernels/triton/variants.py), timed
# beside the kernels they would replace (UNTIMED): the whole timed call (forward and
# backward) runs with the switch on "untimed"; where no rewrite serves a case, the row
# times the timed kernels again.


def _untimed(call: Callable[[], object]) -> Callable[[], object]:
    def run():
        with variants.running(variants.UNTIMED):
            return call()
    return run


def _ours(backend: str) -> Callable[[dict], torch.Tensor]:
    return lambda x: pk.cross_attention(x["q"], x["k"], x["v"], key_padding_mask=x["mask"], causal=x["causal"],
                                        residual=x["residual"], backend=backend)


def providers(device: torch.device) -> dict[str, Callable[[dict], torch.Tensor]]:
    """Every provider measured on `device`, less those named in BENCH_SKIP_PROVIDERS
    (comma-separated; gpu_run.sh skips the CUDA kernels when their tests failed)."""
    every = _all_providers(device)
    skipped = {name.strip() for name in os.environ.get("BENCH_SKIP_PROVIDERS", "").split(",")}
    return {name: fn for name, fn in every.items() if name not in skipped}


def _all_providers(device: torch.device) -> dict[str, Callable[[dict], torch.Tensor]]:
    ours = {"perceiver_kernels": _ours("auto")}
    if device.type == "cuda":
        ours["perceiver_kernels[triton]"] = _ours("triton")
        ours[UNTIMED] = _ours("triton")
        ours["perceiver_kernels[cuda]"] = _ours("cuda")
    ours["naive"] = lambda x: pk.reference_attention(x["q"], x["k"], x["v"], key_padding_mask=x["mask"],
                                                     residual=x["residual"], causal=x["causal"])
    if device.type != "cuda":
        return {**ours, "sdpa": _sdpa(None)}
    sdpa = {f"sdpa-{name.lower()}": _sdpa(name)
            for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")}
    return {**ours, **sdpa}


def _timed_call(fn: Callable[[dict], torch.Tensor], inputs: dict, backward: bool) -> Callable[[], object]:
    if not backward:
        return lambda: fn(inputs)
    leaves = {name: inputs[name].detach().requires_grad_() for name in ("q", "k", "v")}
    inputs = {**inputs, **leaves}
    try:
        dout = torch.randn_like(fn(inputs))
    except (RuntimeError, ValueError):  # a backend that refuses these inputs: let the measurement say so
        return lambda: fn(inputs)
    # autograd.grad rather than .backward(): no gradient accumulation inside the timing.
    return lambda: torch.autograd.grad(fn(inputs), tuple(leaves.values()), dout)


def run_suite(device: torch.device, size: str, ceilings: dict, progress: Callable[[str], None],
              rows: Optional[list] = None) -> list[dict]:
    """Measures every case; appends each row to `rows` (a new list by default) as it is
    measured, so that a stopped run keeps what it measured, and returns it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [] if rows is None else rows
    for shape, backward in cases(device, size):
        pass_name = "forward+backward" if backward else "forward"
        progress(f"{shape.name} {pass_name}")
        inputs = make_inputs(shape, device, dtype)
        case_flops = shape.flops(backward)
        case_bytes = shape.min_bytes(inputs["q"].element_size(), backward)
        roofline_ms = 1e3 * max(case_flops / (ceilings["matmul_tflops"] * 1e12),
                                case_bytes / (ceilings["copy_gbps"] * 1e9))
        calls = {name: _timed_call(fn, inputs, backward) for name, fn in providers(device).items()}
        if UNTIMED in calls:
            calls[UNTIMED] = _untimed(calls[UNTIMED])
        for name, result in measure_case(calls, device).items():
            row = {"suite": "op", "pass": pass_name, "case": shape.name, "provider": name,
                   "B": shape.batch, "H": shape.heads, "Nq": shape.num_queries, "Nk": shape.num_keys,
                   "d": shape.head_dim, "masked": shape.masked, "pad_fraction": shape.pad_fraction,
                   "causal": shape.causal, "residual": shape.residual,
                   "padded_keys": shape.batch * shape.padded_keys, "dtype": str(dtype).replace("torch.", ""),
                   "sweep": shape.sweep, "flops": case_flops, "min_bytes": case_bytes, "roofline_ms": roofline_ms,
                   **result}
            if name in OUR_BACKENDS:
                q = inputs["q"].detach().requires_grad_(backward)
                with variants.running(variants.UNTIMED if name == UNTIMED else variants.current):
                    row["path"] = pk.explain(q, inputs["k"], inputs["v"], key_padding_mask=inputs["mask"],
                                             residual=inputs["residual"], causal=shape.causal,
                                             backend=OUR_BACKENDS[name]).path
            if row["status"] == "ok":
                row["tflops"] = throughput(case_flops, row["median_ms"])
                row["gbps"] = case_bytes / (row["median_ms"] * 1e-3) / 1e9
                row["roofline_pct"] = 100 * roofline_ms / row["median_ms"]
            rows.append(row)
        del inputs, calls
    return rows
