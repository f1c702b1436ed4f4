"""The ENCODE and DECODE backward in five matrix products, with the short side resident.

With P_ij = exp(s_ij - lse_i) recomputed from the forward's log-sum-exp, dO the upstream
gradient and Delta_i = dO_i . O_i (O the attention output without residual; ENCODE
reads it from attention_bwd_delta_kernel, DECODE forms it from the tiles of O and dO):

    S  = Q K^T                      dP = dO V^T
    dV = P^T dO                     dS = P * (dP - Delta)
    dK = scale * dS^T Q             dQ = scale * dS K

Each (query, key) pair is visited once: five products, against seven for the two-kernel
backward (kernels/attention_bwd.py), which forms the scores once for dK/dV and again
for dQ; and each operand is read once.

- attention_bwd_encode_kernel (few queries over many keys): a program owns one head's
  range of key blocks and keeps all the head's queries resident (Q, dO, lse, Delta and
  the fp32 dQ accumulator). Every query is present, so each key block's dK and dV are
  complete: written once, never summed. dQ sums over the program's range; its partial
  (one per program of the head) goes to DQ[chunk].
- attention_bwd_decode_kernel (many queries over few keys), the mirror image: K, V and
  the fp32 dK/dV accumulators resident, a range of query tiles streamed, each tile's dQ
  complete and written once, the range's dK/dV partial to DK[chunk], DV[chunk].

The resident side is on the rows of the products whose results feed another (the
scores, and the gradient that stays resident): Triton puts all of a program's warps on
the rows of such products, so they need the resident tile's 64-256 rows, not a streamed
block's 16-64 (with fewer rows than warps cover, warpgroups repeat each other's work).
The gradient of the streamed block is formed transposed, its rows the head dim (ENCODE:
dK^T = Q^T dS, dV^T = dO^T P; DECODE: dQ^T = K^T dS^T), so at head dims of 64 and more
every product has the 64 rows Hopper's wgmma takes, whatever the block.

sum_chunks_kernel sums the partials of a head's programs in chunk order (deterministic,
no atomics) into the gradient's dtype and layout.

Padding keys read 0 and get P = 0: their dK and dV are exactly 0 whatever K and V hold
there, and rows whose keys are all padding (lse = -inf) get dQ exactly 0. Blocks of keys
made only of padding at either end of an ENCODE program's range are stored as zeros
without loading K or V; a DECODE program whose keys are all padding (or, causally, the
first Nq - Nk rows, which see none) stores zero dQ without loading Q or dO.
"""

import triton
import triton.language as tl

from .common import (head_start, kept_key_range, key_rows_gradients, load_rows, program_coordinates,
                     query_rows_gradients, row_lse, row_stats, store_rows, usable_keys)


@triton.jit
def _store_key_rows(DK, DV, dk, dv, keys, num_keys, stride_dkn, stride_dkd, stride_dvn, stride_dvd, head_dim_qk,
                    head_dim_v, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK and dV of the rows `keys` (those below num_keys), in their tensors' dtype."""
    written = keys < num_keys
    store_rows(DK, dk, keys, written, stride_dkn, stride_dkd, head_dim_qk, BLOCK_DQK)
    store_rows(DV, dv, keys, written, stride_dvn, stride_dvd, head_dim_v, BLOCK_DV)


@triton.jit
def _store_zero_key_blocks(DK, DV, block_start, block_end, num_keys, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                           head_dim_qk, head_dim_v, BLOCK_INNER: tl.constexpr, BLOCK_DQK: tl.constexpr,
                           BLOCK_DV: tl.constexpr):
    """dK = dV = 0 for the key blocks from block_start to block_end (keys all padding)."""
    zero_dk = tl.zeros([BLOCK_INNER, BLOCK_DQK], dtype=tl.float32)
    zero_dv = tl.zeros([BLOCK_INNER, BLOCK_DV], dtype=tl.float32)
    for start in range(block_start, block_end, BLOCK_INNER):
        keys = (start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        _store_key_rows(DK, DV, zero_dk, zero_dv, keys, num_keys, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                        head_dim_qk, head_dim_v, BLOCK_DQK, BLOCK_DV)


@triton.jit
def _partial_start(ptr, strides, chunk, b, h):
    """Where chunk `chunk`'s partial for head h of batch entry b starts in a (chunks, B,
    H, rows, channels) tensor; the chunk's offset in 64 bits (partials may pass 2^31
    elements)."""
    return ptr + chunk.to(tl.int64) * strides[0] + b * strides[1] + h * strides[2]


@triton.jit
def attention_bwd_encode_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DQ, DK, DV,
    q_strides, k_strides, v_strides, pad_strides, do_strides, dq_strides, dk_strides, dv_strides,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, qk_scale_log2,
    num_chunks, keys_per_chunk,
    HAS_MASK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_INNER: tl.constexpr, BLOCK_RESIDENT: tl.constexpr,
):
    """dK, dV of the key blocks of one chunk of a head's keys (complete: every query is
    resident), and the chunk's part of dQ (DQ[chunk]).

    Queries on the rows: S = Q K^T, dP = dO V^T and dQ += dS K have the BLOCK_RESIDENT
    resident rows as theirs; dK and dV, whose rows would be the key block, are formed
    transposed (dK^T = Q^T dS, dV^T = dO^T P: rows are channels), so that no product
    has a key block's few rows. keys_per_chunk is a multiple of BLOCK_INNER. The blocks
    before the first and after the last kept key of the chunk (a padding suffix, as
    variable-length inputs leave) are written as zeros without loading K or V."""
    chunk, _, bh, b, h = program_coordinates(num_chunks, 1, heads)
    pad_ptr = PAD + b * pad_strides[0]
    key_start = tl.minimum(chunk * keys_per_chunk, num_keys)  # a forced chunk count may leave some empty
    key_end = tl.minimum(key_start + keys_per_chunk, num_keys)
    kept_start, kept_end = kept_key_range(pad_ptr, key_start, key_end, pad_strides[1], HAS_MASK)
    first = key_start + (kept_start - key_start) // BLOCK_INNER * BLOCK_INNER
    last = tl.where(kept_end > kept_start, key_start + tl.cdiv(kept_end - key_start, BLOCK_INNER) * BLOCK_INNER,
                    first)

    dk_ptr = head_start(DK, dk_strides, b, h)
    dv_ptr = head_start(DV, dv_strides, b, h)
    _store_zero_key_blocks(dk_ptr, dv_ptr, key_start, first, num_keys, dk_strides[2], dk_strides[3], dv_strides[2],
                           dv_strides[3], head_dim_qk, head_dim_v, BLOCK_INNER, BLOCK_DQK, BLOCK_DV)
    _store_zero_key_blocks(dk_ptr, dv_ptr, last, key_end, num_keys, dk_strides[2], dk_strides[3], dv_strides[2],
                           dv_strides[3], head_dim_qk, head_dim_v, BLOCK_INNER, BLOCK_DQK, BLOCK_DV)

    rows = tl.arange(0, BLOCK_RESIDENT).to(tl.int64)
    row_ok = rows < num_queries
    q = load_rows(head_start(Q, q_strides, b, h), rows, row_ok, q_strides[2], q_strides[3], head_dim_qk, BLOCK_DQK)
    do = load_rows(head_start(DO, do_strides, b, h), rows, row_ok, do_strides[2], do_strides[3], head_dim_v, BLOCK_DV)
    lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)
    dq = tl.zeros([BLOCK_RESIDENT, BLOCK_DQK], dtype=tl.float32)

    k_ptr = head_start(K, k_strides, b, h)
    v_ptr = head_start(V, v_strides, b, h)
    causal_offset = num_keys - num_queries
    for block_start in range(first, last, BLOCK_INNER):
        keys = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        key_ok = usable_keys(pad_ptr, keys, kept_end, pad_strides[1], HAS_MASK)
        k = load_rows(k_ptr, keys, key_ok, k_strides[2], k_strides[3], head_dim_qk, BLOCK_DQK)
        v = load_rows(v_ptr, keys, key_ok, v_strides[2], v_strides[3], head_dim_v, BLOCK_DV)
        p, ds, dq = query_rows_gradients(q, do, rows, lse, delta, k, v, keys, key_ok, dq, causal_offset,
                                         qk_scale_log2, CAUSAL, DOT_PRECISION)
        dv_t = tl.dot(tl.trans(do), p, input_precision=DOT_PRECISION)
        dk_t = tl.dot(tl.trans(q), ds, input_precision=DOT_PRECISION)
        _store_key_rows(dk_ptr, dv_ptr, tl.trans(dk_t) * scale, tl.trans(dv_t), keys, num_keys, dk_strides[2],
                        dk_strides[3], dv_strides[2], dv_strides[3], head_dim_qk, head_dim_v, BLOCK_DQK, BLOCK_DV)

    store_rows(_partial_start(DQ, dq_strides, chunk, b, h), dq * scale, rows, row_ok, dq_strides[3], dq_strides[4],
               head_dim_qk, BLOCK_DQK)


@triton.jit
def attention_bwd_decode_kernel(
    Q, K, V, PAD, DO, LSE, OUT, DQ, DK, DV,
    q_strides, k_strides, v_strides, pad_strides, do_strides, out_strides, dq_strides, dk_strides, dv_strides,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, qk_scale_log2,
    num_chunks, queries_per_chunk,
    HAS_MASK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_INNER: tl.constexpr, BLOCK_RESIDENT: tl.constexpr,
):
    """dQ of the query tiles of one chunk of a head's queries (complete: every key is
    resident), and the chunk's part of dK and dV (DK[chunk], DV[chunk]).

    Keys on the rows: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q have the
    BLOCK_RESIDENT resident rows as theirs; dQ, whose rows would be the query tile, is
    formed transposed (dQ^T = K^T dS^T: rows are channels). queries_per_chunk is a
    multiple of BLOCK_INNER. Delta comes from the tile's rows of O and dO, which the
    program reads anyway (DECODE's rows are many: a separate pass would read dO twice).
    Tiles whose rows see no key (all keys padding; causally, the first Nq - Nk rows)
    store dQ = 0 without loading Q, dO or O."""
    chunk, _, bh, b, h = program_coordinates(num_chunks, 1, heads)
    pad_ptr = PAD + b * pad_strides[0]
    keys = tl.arange(0, BLOCK_RESIDENT).to(tl.int64)
    key_ok = usable_keys(pad_ptr, keys, num_keys, pad_strides[1], HAS_MASK)
    k = load_rows(head_start(K, k_strides, b, h), keys, key_ok, k_strides[2], k_strides[3], head_dim_qk, BLOCK_DQK)
    v = load_rows(head_start(V, v_strides, b, h), keys, key_ok, v_strides[2], v_strides[3], head_dim_v, BLOCK_DV)
    dk = tl.zeros([BLOCK_RESIDENT, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_RESIDENT, BLOCK_DV], dtype=tl.float32)

    row_start = tl.minimum(chunk * queries_per_chunk, num_queries)  # a forced chunk count may leave some empty
    row_end = tl.minimum(row_start + queries_per_chunk, num_queries)
    causal_offset = num_keys - num_queries
    # The tiles from `first` on hold a row that sees a key.
    first = tl.where(tl.max(key_ok.to(tl.int32)) > 0, row_start, row_end)
    if CAUSAL:
        first = tl.minimum(row_end, tl.maximum(
            first, row_start + tl.maximum(0, -causal_offset - row_start) // BLOCK_INNER * BLOCK_INNER))
    dq_ptr = head_start(DQ, dq_strides, b, h)
    zero_dq = tl.zeros([BLOCK_INNER, BLOCK_DQK], dtype=tl.float32)
    for block_start in range(row_start, first, BLOCK_INNER):
        rows = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        store_rows(dq_ptr, zero_dq, rows, rows < row_end, dq_strides[2], dq_strides[3], head_dim_qk, BLOCK_DQK)

    q_ptr = head_start(Q, q_strides, b, h)
    do_ptr = head_start(DO, do_strides, b, h)
    o_ptr = head_start(OUT, out_strides, b, h)
    for block_start in range(first, row_end, BLOCK_INNER):
        rows = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        row_ok = rows < row_end
        q = load_rows(q_ptr, rows, row_ok, q_strides[2], q_strides[3], head_dim_qk, BLOCK_DQK)
        do = load_rows(do_ptr, rows, row_ok, do_strides[2], do_strides[3], head_dim_v, BLOCK_DV)
        out = load_rows(o_ptr, rows, row_ok, out_strides[2], out_strides[3], head_dim_v, BLOCK_DV)
        delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        lse = row_lse(LSE + bh * num_queries, rows, row_ok)
        ds_t, dk, dv = key_rows_gradients(k, v, keys, key_ok, q, do, rows, lse, delta, dk, dv, causal_offset,
                                          qk_scale_log2, CAUSAL, DOT_PRECISION)
        dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION)
        store_rows(dq_ptr, tl.trans(dq_t) * scale, rows, row_ok, dq_strides[2], dq_strides[3], head_dim_qk, BLOCK_DQK)

    _store_key_rows(_partial_start(DK, dk_strides, chunk, b, h), _partial_start(DV, dv_strides, chunk, b, h),
                    dk * scale, dv, keys, num_keys, dk_strides[3], dk_strides[4], dv_strides[3], dv_strides[4],
                    head_dim_qk, head_dim_v, BLOCK_DQK, BLOCK_DV)


@triton.jit
def sum_chunks_kernel(
    PART, OUT,
    part_strides, out_strides,
    heads, length, dim, num_chunks,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT = sum over c of PART[c] (fp32 partials of a (B, H, length, dim) gradient), added
    in chunk order so that the result is the same bits on every run."""
    block, _, bh, b, h = program_coordinates(tl.cdiv(length, BLOCK_ROWS), 1, heads)
    rows = (block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_ok = rows < length
    part_ptr = PART + b * part_strides[1] + h * part_strides[2]
    total = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for _ in range(0, num_chunks):
        total += load_rows(part_ptr, rows, row_ok, part_strides[3], part_strides[4], dim, BLOCK_D)
        part_ptr += part_strides[0]  # a pointer step: no 32-bit chunk x stride product
    store_rows(head_start(OUT, out_strides, b, h), total, rows, row_ok, out_strides[2], out_strides[3], dim, BLOCK_D)
