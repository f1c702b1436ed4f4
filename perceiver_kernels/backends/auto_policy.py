"""When "auto" runs the fused kernels on a GPU instead of SDPA: where they were measured faster.

Three H200 runs (benchmarks/results/2026-12-01-h200-run1..3, bf16; the first GPU run,
2026-11-30-h200, agreed) timed the Triton kernels against every SDPA backend on 31
forward and 14 forward+backward cases. They lost to cuDNN or FlashAttention on almost
every unmasked shape (forward 0.20-0.98x, forward+backward 0.18-0.90x) and won where
these rules say:

- a key padding mask on a shape whose SDPA kernels launch fewer blocks than the GPU
  has SMs: SDPA's masked paths (cuDNN, memory-efficient) do not split the keys, the
  Triton kernels do. ENC-3 masked (B*H = 8, 256 latents, 400k keys): 5.52x forward,
  2.21x forward + backward; ENC-1 masked (B*H = 64, 256 blocks of 64 rows) lost, 0.71x;
- a residual fused into a memory-bound DECODE without gradients (few keys, so the
  output's extra read and write that SDPA + add pays is a large share): DEC-1 with a
  residual 1.03x (1.49x on the first run). In training the residual is added outside
  the kernels, and DEC-1 with a residual then lost (0.79x), so the rule needs no
  gradients;
- DECODE with heads of at most 32 channels without gradients: DEC-1 d32 1.12x (the
  same shape at 64 channels 0.77x, at 128 0.57x; ENCODE at 32, ENC-4, 0.88x).

None of them for heads over 256 channels, whose wide kernels lost everywhere.

Wins within 6% (ENC M=16384 1.04x, ENC M=65536 1.06x, AR-64k 1.01x) stay with SDPA:
the next point of the same sweep lost. Everything else goes to SDPA until a GPU run
shows a kernel faster; `backend="triton"` still runs the kernels, and explain() gives
this reason.
"""

from __future__ import annotations

from ..chunking import cdiv, multiprocessor_count
from ..problem import Problem

# Rows per block of SDPA's masked kernels (cuDNN and memory-efficient use 64 or 128).
SDPA_QUERY_BLOCK_ROWS = 64
# DECODE whose keys are this few is bound by reading queries and writing outputs.
MEMORY_BOUND_KEYS = 512
# DECODE with heads this narrow beat SDPA without gradients (DEC-1 d32).
NARROW_DECODE_HEAD_DIM = 32
# Wider heads run the wide kernels, which lost everywhere (IMG-261, IMG-322, FLOW-512
# decode: 0.23-0.69x of SDPA's math backend; the torch backend's chunked products won).
WIDEST_WINNING_HEAD_DIM = 256

SDPA_FASTER = ("auto prefers SDPA (backend='torch') here: on an H200 the Triton kernels ran 0.18-0.98x of SDPA's "
               "best backend on unmasked shapes and won only with a key padding mask on shapes too small for SDPA "
               "to fill the GPU, or on memory-bound decoding without gradients with a fused residual or heads "
               "of at most 32 channels (benchmarks/results/2026-12-01-h200-run2); backend='triton' runs them")


def kernels_measured_faster(problem: Problem) -> bool:
    """Whether the shape is one where the fused kernels beat SDPA's best backend on a GPU."""
    if max(problem.head_dim_qk, problem.head_dim_v) > WIDEST_WINNING_HEAD_DIM:
        return False
    sdpa_blocks = problem.batch * problem.heads * cdiv(problem.num_queries, SDPA_QUERY_BLOCK_ROWS)
    if problem.has_mask and sdpa_blocks < multiprocessor_count(problem.device):
        return True
    decode = problem.num_queries >= 4 * problem.num_keys
    if problem.requires_grad or not decode:
        return False
    fused_residual = problem.has_residual and problem.num_keys <= MEMORY_BOUND_KEYS
    return fused_residual or max(problem.head_dim_qk, problem.head_dim_v) <= NARROW_DECODE_HEAD_DIM


def sdpa_faster_reason(problem: Problem) -> str:
    """The reason auto gives for SDPA over the kernels, or "" when the kernels win here."""
    return "" if kernels_measured_faster(problem) else SDPA_FASTER
