"""Fused backward kernels for the asymmetric shapes (Triton): one pass, no recomputation.

The general backward (attention_bwd.py) runs two kernels, each recomputing the scores
and dP = dO V^T: 7 matrix products per (query, key) block. When one side of the
attention fits a program, one kernel does it in 5 (S, dV, dP, dK, dQ: the backward at
2.5x the forward's FLOPs) and reads the long side once:

- attention_bwd_encode_kernel (few queries, many keys): a program holds every query
  of its (batch, head) with dO, lse and Delta, and walks a chunk of the keys block by
  block. Each key block's dK and dV are complete when its block is done (every query
  was there) and are stored; dQ of all the queries accumulates over the chunk's key
  blocks and is written as the chunk's fp32 partial, summed afterwards in a fixed order.
- attention_bwd_decode_kernel (many queries, few keys): the mirror image. A program
  holds every key of its (batch, head) and walks a chunk of the queries; each query
  block's dQ is stored when done, dK and dV accumulate as the chunk's partials.

With the math of attention_bwd.py: P = exp(S - lse) from the forward's lse, dS = P *
(dP - Delta). Partials and a fixed-order sum instead of atomics keep the gradients
deterministic. Padding keys get P = 0, so their dK and dV are exactly 0; the encode
kernel walks only the kept key range (kept_key_range).
"""

import triton
import triton.language as tl

from .common import kept_key_range, load_rows, program_coordinates, row_stats, store_rows, usable_keys


@triton.jit
def attention_bwd_encode_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqc, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, qk_scale_log2,
    num_chunks, keys_per_chunk,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    """Every query (BLOCK_OUTER >= Nq rows) over one chunk of the keys in blocks of BLOCK_INNER:
    dK, dV of the chunk's keys, and the chunk's partial dQ into DQ[chunk]."""
    _, chunk, bh, b, h = program_coordinates(1, num_chunks, heads)

    rows = tl.arange(0, BLOCK_OUTER).to(tl.int64)
    row_ok = rows < num_queries
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_DQK)
    do = load_rows(DO + b * stride_dob + h * stride_doh, rows, row_ok, stride_dom, stride_dod, head_dim_v, BLOCK_DV)
    lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)

    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    dk_ptr = DK + b * stride_dkb + h * stride_dkh
    dv_ptr = DV + b * stride_dvb + h * stride_dvh
    pad_ptr = PAD + b * stride_pb
    dq = tl.zeros([BLOCK_OUTER, BLOCK_DQK], dtype=tl.float32)
    chunk_start = chunk * keys_per_chunk
    chunk_end = tl.minimum(chunk_start + keys_per_chunk, num_keys)
    key_start, key_end = kept_key_range(pad_ptr, chunk_start, chunk_end, stride_pn, HAS_MASK)
    # Blocks on the chunk's grid: the ones before and after the kept range hold only
    # padding, whose gradients are 0 (stored without loading anything).
    first = chunk_start + (key_start - chunk_start) // BLOCK_INNER * BLOCK_INNER
    last = tl.maximum(first, first + tl.cdiv(key_end - first, BLOCK_INNER) * BLOCK_INNER)
    zero_k = tl.zeros([BLOCK_INNER, BLOCK_DQK], dtype=tl.float32)
    zero_v = tl.zeros([BLOCK_INNER, BLOCK_DV], dtype=tl.float32)
    for block_start in range(chunk_start, first, BLOCK_INNER):
        keys = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        store_rows(dk_ptr, zero_k, keys, keys < chunk_end, stride_dkn, stride_dkd, head_dim_qk, BLOCK_DQK)
        store_rows(dv_ptr, zero_v, keys, keys < chunk_end, stride_dvn, stride_dvd, head_dim_v, BLOCK_DV)
    for block_start in range(last, chunk_end, BLOCK_INNER):
        keys = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        store_rows(dk_ptr, zero_k, keys, keys < chunk_end, stride_dkn, stride_dkd, head_dim_qk, BLOCK_DQK)
        store_rows(dv_ptr, zero_v, keys, keys < chunk_end, stride_dvn, stride_dvd, head_dim_v, BLOCK_DV)
    for block_start in range(first, last, BLOCK_INNER):
        keys = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        written = keys < chunk_end
        key_ok = usable_keys(pad_ptr, keys, chunk_end, stride_pn, HAS_MASK)
        k = load_rows(k_ptr, keys, key_ok, stride_kn, stride_kd, head_dim_qk, BLOCK_DQK)
        v = load_rows(v_ptr, keys, key_ok, stride_vn, stride_vd, head_dim_v, BLOCK_DV)
        # Transposed scores (keys x queries), so that P^T dO and dS^T Q need no transposes.
        t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.where(key_ok[:, None], tl.math.exp2(t - lse[None, :]), 0.0)
        dv = tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds, q, input_precision=DOT_PRECISION)
        dq += tl.dot(tl.trans(ds), k, input_precision=DOT_PRECISION)
        store_rows(dk_ptr, dk * scale, keys, written, stride_dkn, stride_dkd, head_dim_qk, BLOCK_DQK)
        store_rows(dv_ptr, dv, keys, written, stride_dvn, stride_dvd, head_dim_v, BLOCK_DV)

    store_rows(DQ + chunk * stride_dqc + b * stride_dqb + h * stride_dqh, dq * scale, rows, row_ok,
               stride_dqm, stride_dqd, head_dim_qk, BLOCK_DQK)


@triton.jit
def attention_bwd_decode_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkc, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvc, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, qk_scale_log2,
    num_chunks, queries_per_chunk,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    """Every key (BLOCK_OUTER >= Nk rows) over one chunk of the queries in blocks of BLOCK_INNER:
    dQ of the chunk's queries, and the chunk's partial dK, dV into DK[chunk], DV[chunk]."""
    _, chunk, bh, b, h = program_coordinates(1, num_chunks, heads)

    keys = tl.arange(0, BLOCK_OUTER).to(tl.int64)
    key_ok = usable_keys(PAD + b * stride_pb, keys, num_keys, stride_pn, HAS_MASK)
    k = load_rows(K + b * stride_kb + h * stride_kh, keys, key_ok, stride_kn, stride_kd, head_dim_qk, BLOCK_DQK)
    v = load_rows(V + b * stride_vb + h * stride_vh, keys, key_ok, stride_vn, stride_vd, head_dim_v, BLOCK_DV)

    q_ptr = Q + b * stride_qb + h * stride_qh
    do_ptr = DO + b * stride_dob + h * stride_doh
    dq_ptr = DQ + b * stride_dqb + h * stride_dqh
    dk = tl.zeros([BLOCK_OUTER, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_OUTER, BLOCK_DV], dtype=tl.float32)
    query_start = chunk * queries_per_chunk
    query_end = tl.minimum(query_start + queries_per_chunk, num_queries)
    for block_start in range(query_start, query_end, BLOCK_INNER):
        rows = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        row_ok = rows < query_end
        q = load_rows(q_ptr, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_DQK)
        do = load_rows(do_ptr, rows, row_ok, stride_dom, stride_dod, head_dim_v, BLOCK_DV)
        lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.where(key_ok[None, :], tl.math.exp2(t - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        store_rows(dq_ptr, tl.dot(ds, k, input_precision=DOT_PRECISION) * scale, rows, row_ok,
                   stride_dqm, stride_dqd, head_dim_qk, BLOCK_DQK)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)

    written = keys < num_keys
    store_rows(DK + chunk * stride_dkc + b * stride_dkb + h * stride_dkh, dk * scale, keys, written,
               stride_dkn, stride_dkd, head_dim_qk, BLOCK_DQK)
    store_rows(DV + chunk * stride_dvc + b * stride_dvb + h * stride_dvh, dv, keys, written,
               stride_dvn, stride_dvd, head_dim_v, BLOCK_DV)
