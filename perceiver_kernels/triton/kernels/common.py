"""What every Triton kernel file shares: the interpreter switch, constants, and the
small @triton.jit helpers that forward and backward both use. (Launch configurations
and autotuning are the launchers' business: perceiver_kernels/triton/configs.py.)
"""

import os

import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it decorates a function, so the kernels of this
# package (decorated when their module is imported) and Triton's own library functions
# (decorated when triton is imported, e.g. by torch) only agree if it was set before
# both; see interpreter_mismatch().
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634  # the launchers scale q.k by scale * LOG2E so that kernels use exp2
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_CONSTEXPR = tl.constexpr(LOG2E)
INF = tl.constexpr(float("inf"))
# Mask bytes one step of kept_key_range reads.
MASK_SCAN_BLOCK = tl.constexpr(1024)


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
def head_start(ptr, strides, b, h):
    """Where head h of batch entry b starts in a (B, H, rows, channels) tensor of these
    strides."""
    return ptr + b * strides[0] + h * strides[1]


@triton.jit
def load_rows(ptr, rows, row_ok, stride_row, stride_d, dim, BLOCK_D: tl.constexpr):
    """Rows `rows` x channels [0, BLOCK_D) of a strided matrix; masked rows and channels read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=row_ok[:, None] & (offs_d < dim)[None, :], other=0.0)


@triton.jit
def dot_rows_t(acc, a_ptr, a_rows, a_ok, stride_a_row, stride_a_d, b_ptr, b_rows, b_ok, stride_b_row, stride_b_d,
               dim, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + A B^T, with A the rows `a_rows` and B the rows `b_rows` of two strided matrices
    sharing `dim` channels (rows not ok and channels past dim read 0), summed over chunks
    of BLOCK_D channels.

    The wide-head kernels compute every product over a head dim this way: neither
    operand is held whole, so registers and shared memory hold one chunk of each
    whatever the head dim, and a dim pads only to a multiple of BLOCK_D (261 runs as 320
    with chunks of 64, not 512). The operands are reloaded for each block they meet,
    from L1/L2 where a program walks the same rows again.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for chunk_start in range(0, dim, BLOCK_D):
        channels = chunk_start + offs_d
        in_dim = channels < dim
        a = tl.load(a_ptr + a_rows[:, None] * stride_a_row + channels[None, :] * stride_a_d,
                    mask=a_ok[:, None] & in_dim[None, :], other=0.0)
        b_t = tl.load(b_ptr + b_rows[None, :] * stride_b_row + channels[:, None] * stride_b_d,
                      mask=b_ok[None, :] & in_dim[:, None], other=0.0)
        acc = tl.dot(a, b_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK: tl.constexpr):
    """Which of `keys` exist (below key_end) and are not padding."""
    key_ok = keys < key_end
    if HAS_MASK:
        is_pad = tl.load(pad_ptr + keys * stride_pad_n, mask=key_ok, other=1)
        key_ok = key_ok & (is_pad == 0)
    return key_ok


@triton.jit
def kept_key_span(pad_ptr, key_start, key_end, stride_pad_n, HAS_MASK: tl.constexpr):
    """(lo, hi, kept) within [key_start, key_end): the first key that is not padding, one
    past the last, and how many keys are kept in between.

    Read from the mask bytes alone, before any K/V: the tiles outside [lo, hi) are
    skipped whole. A mask that pads the tail of each row (variable-length inputs, the
    common case) then costs only the keys it keeps, and with kept == hi - lo (no holes)
    every tile inside the range is known to be whole without reading its mask bytes
    again; holes are masked tile by tile. Empty (lo >= hi, kept = 0) when every key is
    padding.
    """
    if HAS_MASK:
        offs = tl.arange(0, MASK_SCAN_BLOCK)
        # int32 tensors from the start, whether the bounds come in as arguments or
        # literals: a loop-carried value must keep its type (key indices fit int32;
        # only the byte offsets below need int64).
        lo = tl.full([], 0, tl.int32) + key_end
        hi = tl.full([], 0, tl.int32) + key_start
        kept = tl.full([], 0, tl.int32)
        for scan_start in range(key_start, key_end, MASK_SCAN_BLOCK):
            keys = scan_start + offs
            is_kept = keys < key_end
            is_kept = is_kept & (tl.load(pad_ptr + keys.to(tl.int64) * stride_pad_n, mask=is_kept, other=1) == 0)
            lo = tl.minimum(lo, tl.min(tl.where(is_kept, keys, key_end), 0))
            hi = tl.maximum(hi, tl.max(tl.where(is_kept, keys + 1, key_start), 0))
            kept += tl.sum(is_kept.to(tl.int32), 0)
        return lo, hi, kept
    return key_start, key_end, key_end - key_start


@triton.jit
def kept_key_range(pad_ptr, key_start, key_end, stride_pad_n, HAS_MASK: tl.constexpr):
    """[lo, hi) of kept_key_span: from the first to the last key that is not padding
    (the count it also takes is dropped, and compiled away, here)."""
    lo, hi, _ = kept_key_span(pad_ptr, key_start, key_end, stride_pad_n, HAS_MASK)
    return lo, hi


@triton.jit
def queries_of_key_block(key_ok, first_key, chunk, queries_per_chunk, num_queries, causal_offset,
                         HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """[start, end) of the queries a block of keys (the first of them first_key) sums its
    dK and dV over in its chunk of the queries: none for a block made only of padding
    (zero gradients without walking the queries); causally, from the first query that
    sees the block's first key (query i sees key j iff j <= i + causal_offset)."""
    query_start = chunk * queries_per_chunk
    query_end = tl.minimum(query_start + queries_per_chunk, num_queries)
    if HAS_MASK:
        query_end = tl.where(tl.max(key_ok.to(tl.int32)) > 0, query_end, query_start)
    if CAUSAL:
        query_start = tl.maximum(query_start, first_key - causal_offset)
    return query_start, query_end


@triton.jit
def keys_of_query_block(pad_ptr, end_query, chunk, keys_per_chunk, num_keys, stride_pad_n, causal_offset,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """[start, end) of the keys a block of queries (ending before end_query) sums its dQ
    over in its chunk of the keys: the kept range of the mask (kept_key_range);
    causally, up to the key its last query reaches."""
    key_start = chunk * keys_per_chunk
    key_end = tl.minimum(key_start + keys_per_chunk, num_keys)
    key_start, key_end = kept_key_range(pad_ptr, key_start, key_end, stride_pad_n, HAS_MASK)
    if CAUSAL:
        key_end = tl.minimum(key_end, end_query + causal_offset)
    return key_start, key_end


@triton.jit
def key_rows_gradients(k, v, keys, key_ok, q, do, rows, lse, delta, dk, dv, causal_offset, qk_scale_log2,
                       CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of keys (rows of k, v) against one block of queries (rows of q, dO, their
    lse in base 2 and Delta): (dS^T, dK + dS^T Q, dV + P^T dO), dS^T in q's dtype and dK
    unscaled (the caller multiplies by scale once).

    The scores are formed transposed, keys on the rows (S^T = K Q^T, dP^T = V dO^T), so
    that P^T dO and dS^T Q need no transposes. Keys not ok (padding, past the end) and,
    CAUSAL, pairs out of reach get P = 0: their rows of dS^T, dK and dV are exactly 0
    (k and v read 0 there, so nothing they hold can leak)."""
    t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
    visible = key_ok[:, None]
    if CAUSAL:
        visible = visible & (keys[:, None] <= rows[None, :] + causal_offset)
    p = tl.where(visible, tl.math.exp2(t - lse[None, :]), 0.0)
    dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds, q, dk, input_precision=DOT_PRECISION)
    return ds, dk, dv


@triton.jit
def query_rows_gradients(q, do, rows, lse, delta, k, v, keys, key_ok, dq, causal_offset, qk_scale_log2,
                         CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of queries (rows of q, dO, their lse in base 2 and Delta) against one
    block of keys (rows of k, v): (P, dS, dQ + dS K), P in dO's dtype, dS in q's and dQ
    unscaled (the caller multiplies by scale once).

    The mirror image of key_rows_gradients, queries on the rows of the scores (S = Q K^T,
    dP = dO V^T). Keys not ok and, CAUSAL, pairs out of reach get P = 0, so their
    columns of P and dS are exactly 0 (k and v read 0 there)."""
    t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
    p = tl.where(visible, tl.math.exp2(t - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    return p.to(do.dtype), ds, dq


@triton.jit
def store_rows(ptr, value, rows, row_ok, stride_row, stride_d, dim, BLOCK_D: tl.constexpr):
    """Stores `value` into rows `rows` x channels [0, dim) of a strided matrix, in its dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(ptr + rows[:, None] * stride_row + offs_d[None, :] * stride_d, value.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < dim)[None, :])


@triton.jit
def row_lse(lse_ptr, rows, row_ok):
    """lse in base 2 with +inf for rows without keys (so their P is 0)."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf")) * LOG2E_CONSTEXPR
    return tl.where(lse == float("-inf"), INF, lse)


@triton.jit
def row_stats(lse_ptr, delta_ptr, rows, row_ok):
    """row_lse, and Delta."""
    return row_lse(lse_ptr, rows, row_ok), tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
