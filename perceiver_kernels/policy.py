"""Where `auto` runs what: every rule measured on a GPU, keyed by the GPU's architecture.

A rule that comes from timing the kernels against PyTorch's SDPA lives here, beside the
run that measured it, and applies only to the architecture it was measured on. On a
GPU of another architecture auto keeps SDPA except where an edge does not depend on the
chip, and explain() says the GPU was not measured.

Measured architectures:

- sm_90: one NVIDIA H200 (132 SMs), bf16, torch 2.11, triton 3.6, three runs of
  2026-12-01 (benchmarks/results/2026-12-01-h200-run1..3; the first GPU run,
  2026-11-30-h200, agreed). The Triton kernels were timed against every SDPA backend on
  31 forward and 14 forward+backward cases (run2). They lost to cuDNN or
  FlashAttention on almost every unmasked shape (forward 0.20-0.98x, forward+backward
  0.18-0.90x) and won where `triton_measured_faster` says:
  - a key padding mask on a shape whose SDPA kernels launch fewer blocks than the GPU
    has SMs: SDPA's masked paths (cuDNN, memory-efficient) do not split the keys, the
    Triton kernels do. ENC-3 masked (B*H = 8, 256 latents, 400k keys): 5.52x forward,
    2.21x forward + backward;
  - a key padding mask on any ENCODE shape: the torch backend must copy k and v with
    their padding rows zeroed before SDPA (SDPA multiplies padding values by 0, and NaN
    in them would leak), a pass over the long side. ENC-1 masked: Triton 1.03 ms, the
    torch backend (auto) 5.20 ms, but under the SDPA priority leak run3 fixed; SDPA's
    cuDNN alone, without the copy, took 0.73 ms, and the copy of ENC-1's 2 x 411 MB
    adds about 0.4 ms at the H200's bandwidth (an estimate: the next run times auto);
  - a residual fused into a memory-bound DECODE without gradients (few keys, so the
    output's extra read and write that SDPA + add pays is a large share): DEC-1 with a
    residual 1.03x (1.49x on the first run). In training the residual is added outside
    the kernels, and DEC-1 with a residual then lost (0.79x);
  - DECODE with heads of at most 32 channels without gradients: DEC-1 d32 1.12x (the
    same shape at 64 channels 0.77x, at 128 0.57x; ENCODE at 32, ENC-4, 0.88x).
  None of them for heads over 256 channels, whose wide kernels lost everywhere (IMG-261,
  IMG-322, FLOW-512 decode: 0.23-0.69x of SDPA's math backend). Wins within 6% (ENC
  M=16384 1.04x, ENC M=65536 1.06x, AR-64k 1.01x) stay with SDPA: the next point of the
  same sweep lost. The CUDA C++ kernels ran 0.21-0.90x of SDPA's best everywhere but
  ENC-3 masked (2.44x, where Triton is faster still), wide kernels included.
  The torch backend's own routes (`torch_route`), where SDPA's default choice lost:
  - heads over 256 channels (SDPA has no flash or cuDNN kernel there, and falls back to
    its math backend, every score in float32, or to its memory-efficient kernel, whose
    backward is slow there): matrix products over query chunks (torch/chunked.py),
    1.7-2.6x SDPA's best forward and 1.2-6.3x forward+backward on the released models'
    wide heads (run3; 28x SDPA's own choice on FLOW-512 training). That edge is SDPA's
    missing kernel, not the chip's: every CUDA GPU takes the route;
  - unmasked 16-bit shapes on which SDPA does not fill the GPU (`sdpa_fills_gpu`):
    SDPA without cuDNN, so flash, which splits the keys where cuDNN (SDPA's default
    choice) does not. ENC-3 (32 blocks of 64 rows): flash 0.74 ms, cuDNN 3.38; ENC-1
    (256 blocks on 132 SMs) kept cuDNN, 0.45 against flash's 0.90.
"""

from __future__ import annotations

from . import machine
from .problem import Problem

# Architecture -> the measurement its rules come from. Every measured rule below holds for
# these architectures only: adding one means timing the rules' cases on it.
MEASURED = {"sm_90": "an H200 (benchmarks/results/2026-12-01-h200-run2)"}

# Rows per block of SDPA's kernels: cuDNN and memory-efficient use 64 or 128, flash
# 128 (two 64-row blocks count as one 128-row block, so one count serves all).
SDPA_QUERY_BLOCK_ROWS = 64
# DECODE whose keys are this few is bound by reading queries and writing outputs.
MEMORY_BOUND_KEYS = 512
# DECODE with heads this narrow beat SDPA without gradients (DEC-1 d32).
NARROW_DECODE_HEAD_DIM = 32
# Heads wider than this have no flash or cuDNN kernel in SDPA, and take the Triton
# kernels' wide path, which lost everywhere it was measured.
SDPA_FUSED_MAX_HEAD_DIM = 256

# The torch backend's routes on a GPU.
CHUNKED = "matrix products in query chunks"
FLASH_FIRST = "flash first"
SDPA_DEFAULT = "sdpa"

INTERPRETER_EXPLICIT_ONLY = ("on cpu Triton runs in its interpreter (TRITON_INTERPRET=1): correct but slow, so only "
                             "an explicit backend='triton' uses it")
TRITON_SLOWER = ("auto prefers SDPA (backend='torch') here: on {measured} the Triton kernels ran 0.18-0.98x of "
                 "SDPA's best backend on unmasked shapes and won only with a key padding mask (on ENCODE shapes, or "
                 "shapes too small for SDPA to fill the GPU), or on memory-bound decoding without gradients with a fused residual or "
                 "heads of at most 32 channels; backend='triton' runs them")
CUDA_SLOWER = ("auto does not choose the CUDA kernels: on {measured} they were correct but slower than SDPA or the "
               "Triton kernels on every measured shape; backend='cuda' runs them")
NOT_MEASURED = ("not measured on this GPU ({architecture}): auto keeps SDPA (backend='torch') except where the "
                "kernels' edge does not depend on the chip (a key padding mask on a shape too small for SDPA to "
                "fill the GPU); backend='{backend}' runs them")


def architecture_of(problem: Problem) -> str:
    return machine.architecture(problem.device.type, problem.device.index)


def sdpa_fills_gpu(problem: Problem) -> bool:
    """Whether SDPA's kernels, one block per query block and head, occupy every SM."""
    blocks = problem.batch * problem.heads * -(-problem.num_queries // SDPA_QUERY_BLOCK_ROWS)
    return blocks >= machine.multiprocessors(problem.device.type, problem.device.index)


def masked_where_sdpa_cannot_split(problem: Problem) -> bool:
    """A key padding mask on a shape too small for SDPA to fill the GPU: its masked
    kernels do not split the keys, the Triton kernels do. An edge of any chip."""
    return problem.has_mask and not sdpa_fills_gpu(problem)


def triton_measured_faster(problem: Problem) -> bool:
    """Where the Triton kernels beat the torch backend on sm_90 (this module's docstring)."""
    if problem.max_head_dim > SDPA_FUSED_MAX_HEAD_DIM:
        return False
    if masked_where_sdpa_cannot_split(problem) or (problem.has_mask and problem.encode):
        return True
    if problem.requires_grad or not problem.decode:
        return False
    fused_residual = problem.has_residual and problem.num_keys <= MEMORY_BOUND_KEYS
    return fused_residual or problem.max_head_dim <= NARROW_DECODE_HEAD_DIM


def auto_declines(backend: str, problem: Problem) -> str:
    """Why auto does not run `backend` on a problem it could serve, or "" if auto may."""
    if backend == "torch":
        return ""
    architecture = architecture_of(problem)
    if architecture == machine.INTERPRETER:
        return INTERPRETER_EXPLICIT_ONLY if backend == "triton" else ""
    measured = MEASURED.get(architecture)
    if measured is None:
        edge = backend == "triton" and masked_where_sdpa_cannot_split(problem) and (
            problem.max_head_dim <= SDPA_FUSED_MAX_HEAD_DIM)
        return "" if edge else NOT_MEASURED.format(architecture=architecture, backend=backend)
    if backend == "cuda":
        return CUDA_SLOWER.format(measured=measured)
    return "" if triton_measured_faster(problem) else TRITON_SLOWER.format(measured=measured)


def torch_route(problem: Problem) -> str:
    """How the torch backend runs a problem: CHUNKED, FLASH_FIRST or SDPA_DEFAULT."""
    if problem.device.type != "cuda":
        return SDPA_DEFAULT
    if problem.max_head_dim > SDPA_FUSED_MAX_HEAD_DIM:
        return SDPA_DEFAULT if problem.dropout else CHUNKED
    if architecture_of(problem) not in MEASURED:
        return SDPA_DEFAULT
    if not problem.has_mask and not sdpa_fills_gpu(problem) and problem.dtype.itemsize == 2 and \
            problem.head_dim_qk == problem.head_dim_v:
        return FLASH_FIRST
    return SDPA_DEFAULT
