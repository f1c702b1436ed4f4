"""When "auto" runs the fused kernels on a GPU instead of SDPA: where they were measured faster.

The first GPU run (an H200, benchmarks/results/2026-11-30-h200, bf16, head dim 64)
timed the Triton kernels against every SDPA backend. They lost to cuDNN or
FlashAttention on every unmasked Perceiver shape (0.72-0.86x forward, 0.48-0.72x
forward + backward) and won in two places, which these rules describe:

- a key padding mask on a shape whose SDPA kernels launch fewer blocks than the GPU
  has SMs: SDPA's masked paths (cuDNN, memory-efficient) do not split the keys, the
  Triton kernels do. ENC-3 masked (B*H = 8, 256 latents, 400k keys): 3.48x forward,
  1.68x forward + backward; ENC-1 masked (B*H = 64, 256 blocks of 64 rows) lost, 0.62x;
- a residual fused into a memory-bound DECODE without gradients (few keys, so the
  output's extra read and write that SDPA + add pays is a large share): DEC-1 with a
  residual 1.49x. In training the residual is added outside the kernels, and DEC-1
  with a residual then lost (0.61x), so the rule needs no gradients.

Everything else goes to SDPA until a GPU run shows a kernel faster; `backend="triton"`
still runs the kernels, and explain() gives this reason.
"""

from __future__ import annotations

from ..chunking import cdiv, multiprocessor_count
from ..problem import Problem

# Rows per block of SDPA's masked kernels (cuDNN and memory-efficient use 64 or 128).
SDPA_QUERY_BLOCK_ROWS = 64
# DECODE whose keys are this few is bound by reading queries and writing outputs.
MEMORY_BOUND_KEYS = 512

SDPA_FASTER = ("auto prefers SDPA (backend='torch') here: on an H200 the Triton kernels ran 0.72-0.86x of SDPA's "
               "best backend on unmasked shapes and won only with a key padding mask on shapes too small for SDPA "
               "to fill the GPU, or a fused residual on memory-bound decoding without gradients "
               "(benchmarks/results/2026-11-30-h200); backend='triton' runs them")


def kernels_measured_faster(problem: Problem) -> bool:
    """Whether the shape is one where the fused kernels beat SDPA's best backend on a GPU."""
    sdpa_blocks = problem.batch * problem.heads * cdiv(problem.num_queries, SDPA_QUERY_BLOCK_ROWS)
    if problem.has_mask and sdpa_blocks < multiprocessor_count(problem.device):
        return True
    decode = problem.num_queries >= 4 * problem.num_keys
    return (problem.has_residual and not problem.requires_grad and decode
            and problem.num_keys <= MEMORY_BOUND_KEYS)


def sdpa_faster_reason(problem: Problem) -> str:
    """The reason auto gives for SDPA over the kernels, or "" when the kernels win here."""
    return "" if kernels_measured_faster(problem) else SDPA_FASTER
