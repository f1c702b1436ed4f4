"""What every Triton kernel file shares: the interpreter and autotuning switches,
constants, and the small @triton.jit helpers that forward and backward both use.
"""

import os

import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it decorates a function, so the kernels of this
# package (decorated when their module is imported) and Triton's own library functions
# (decorated when triton is imported, e.g. by torch) only agree if it was set before
# both; see interpreter_mismatch(). The interpreter (the CPU test path) runs in numpy
# where tuning means nothing; PERCEIVER_KERNELS_AUTOTUNE=0 skips tuning on GPUs (fast
# first calls, e.g. in test suites that visit hundreds of shapes).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("PERCEIVER_KERNELS_AUTOTUNE", "1") != "0" and not INTERPRETED

LOG2E = 1.4426950408889634  # the launchers scale q.k by scale * LOG2E so that kernels use exp2
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_CONSTEXPR = tl.constexpr(LOG2E)


def _no_benchmark(kernel_call, quantiles):
    """The autotuners' timer without autotuning: the pruning leaves one config, which
    older Triton releases still time at every new tuning key; this times nothing."""
    return [0.0] * len(quantiles)


AUTOTUNE_TIMER = None if AUTOTUNE else _no_benchmark


def interpreter_mismatch() -> str:
    """Why the kernels cannot run in this process's Triton mode, or "".

    TRITON_INTERPRET set (or unset) after `import triton` leaves Triton's library
    compiled while these kernels are interpreted (or the reverse); the first launch
    then fails inside the kernel. Asked by the triton backend, so explain() refuses
    what a call could not run.
    """
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without these internals: nothing to compare
        return ""
    if isinstance(standard.cdiv, InterpretedFunction) == INTERPRETED:
        return ""
    state = "set" if INTERPRETED else "unset"
    return (f"TRITON_INTERPRET was {state} for these kernels but not when triton was imported (torch imports it): "
            "set it before the first import of torch")


@triton.jit
def program_coordinates(num_blocks, num_chunks, heads):
    """(block, chunk, bh, b, h) of this program. Programs enumerate blocks fastest, then
    chunks, then batch*head, so the programs running together share one head's data in L2."""
    pid = tl.program_id(0)
    block = pid % num_blocks
    chunk = (pid // num_blocks) % num_chunks
    bh = (pid // (num_blocks * num_chunks)).to(tl.int64)
    return block, chunk, bh, bh // heads, bh % heads


@triton.jit
def load_rows(ptr, rows, row_ok, stride_row, stride_d, dim, BLOCK_D: tl.constexpr):
    """Rows `rows` x channels [0, BLOCK_D) of a strided matrix; masked rows and channels read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=row_ok[:, None] & (offs_d < dim)[None, :], other=0.0)


@triton.jit
def usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK: tl.constexpr):
    """Which of `keys` exist (below key_end) and are not padding."""
    key_ok = keys < key_end
    if HAS_MASK:
        is_pad = tl.load(pad_ptr + keys * stride_pad_n, mask=key_ok, other=1)
        key_ok = key_ok & (is_pad == 0)
    return key_ok
