"""Backward kernels of fused cross-attention (Triton).

With P_ij = exp(s_ij - lse_i) recomputed from the forward's log-sum-exp, the upstream
gradient dO and Delta_i = sum_d dO_id * O_id (O the attention output: the kernel
backends add a residual outside the kernels when gradients are wanted):

    dV_j = sum_i P_ij dO_i
    dS_ij = P_ij * (dO_i . v_j - Delta_i)
    dK_j = scale * sum_i dS_ij q_i
    dQ_i = scale * sum_j dS_ij k_j

Two kernels, each parallel over the blocks of what it writes and, optionally, split
over the dimension it sums:
- attention_bwd_dkdv_kernel: one program per (key block, query chunk, batch*head).
  ENCODE has very many key blocks, so one chunk suffices; DECODE has few key blocks
  and very many queries, so the queries are cut into chunks, each writing fp32
  partial dK/dV that a second stage sums.
- attention_bwd_dq_kernel: one program per (query block, key chunk, batch*head),
  the mirror image: DECODE needs one chunk, ENCODE splits the keys.

Partials plus a reduction (rather than fp32 atomics) keep the backward deterministic
and its extra memory at (chunks x the gradient's size), which the plan keeps small.

Rows whose keys are all padding have lse = -inf: their P is taken against +inf, so
it is 0 and every gradient they contribute is exactly 0; padding keys get P = 0, so
their dK and dV are exactly 0.
"""

import triton
import triton.language as tl

from .common import (key_rows_gradients, keys_of_query_block, load_rows, program_coordinates, queries_of_key_block,
                     query_rows_gradients, row_stats, store_rows, usable_keys)


@triton.jit
def attention_bwd_delta_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    heads, num_queries, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Delta_i = sum_d dO_id * O_id, in fp32 from the outputs' own dtype:
    no fp32 copies of out and dout (DEC-1 peaked at 1.7x SDPA's memory with them)."""
    tile, _, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M), 1, heads)
    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    out = load_rows(OUT + b * stride_ob + h * stride_oh, rows, row_ok, stride_om, stride_od, head_dim_v,
                    BLOCK_DV).to(tl.float32)
    dout = load_rows(DO + b * stride_dob + h * stride_doh, rows, row_ok, stride_dom, stride_dod, head_dim_v,
                     BLOCK_DV).to(tl.float32)
    tl.store(DELTA + bh * num_queries + rows, tl.sum(dout * out, 1), mask=row_ok)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkc, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvc, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, qk_scale_log2,
    num_chunks, queries_per_chunk,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr, CAUSAL: tl.constexpr,
):
    """dK, dV of BLOCK_OUTER keys over one chunk of the queries; DK/DV[chunk] receive them.

    CAUSAL: query i sees key j only if j <= i + Nk - Nq, so the queries before the
    block's first key's first viewer are skipped and the rest checked per (key, query)."""
    key_block, chunk, bh, b, h = program_coordinates(tl.cdiv(num_keys, BLOCK_OUTER), num_chunks, heads)

    keys = (key_block * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)).to(tl.int64)
    key_ok = usable_keys(PAD + b * stride_pb, keys, num_keys, stride_pn, HAS_MASK)
    k = load_rows(K + b * stride_kb + h * stride_kh, keys, key_ok, stride_kn, stride_kd, head_dim_qk, BLOCK_DQK)
    v = load_rows(V + b * stride_vb + h * stride_vh, keys, key_ok, stride_vn, stride_vd, head_dim_v, BLOCK_DV)

    q_ptr = Q + b * stride_qb + h * stride_qh
    do_ptr = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_OUTER, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_OUTER, BLOCK_DV], dtype=tl.float32)
    causal_offset = num_keys - num_queries
    query_start, query_end = queries_of_key_block(key_ok, key_block * BLOCK_OUTER, chunk, queries_per_chunk,
                                                  num_queries, causal_offset, HAS_MASK, CAUSAL)
    for block_start in range(query_start, query_end, BLOCK_INNER):
        rows = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        row_ok = rows < query_end
        q = load_rows(q_ptr, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_DQK)
        do = load_rows(do_ptr, rows, row_ok, stride_dom, stride_dod, head_dim_v, BLOCK_DV)
        lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)
        _, dk, dv = key_rows_gradients(k, v, keys, key_ok, q, do, rows, lse, delta, dk, dv, causal_offset,
                                       qk_scale_log2, CAUSAL, DOT_PRECISION)

    written = keys < num_keys
    store_rows(DK + chunk * stride_dkc + b * stride_dkb + h * stride_dkh, dk * scale, keys, written,
                stride_dkn, stride_dkd, head_dim_qk, BLOCK_DQK)
    store_rows(DV + chunk * stride_dvc + b * stride_dvb + h * stride_dvh, dv, keys, written,
                stride_dvn, stride_dvd, head_dim_v, BLOCK_DV)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqc, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, qk_scale_log2,
    num_chunks, keys_per_chunk,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr, CAUSAL: tl.constexpr,
):
    """dQ of BLOCK_OUTER queries over one chunk of the keys; DQ[chunk] receives it.

    CAUSAL: keys past the block's last query's reach are skipped, the rest checked per
    (query, key)."""
    query_block, chunk, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_OUTER), num_chunks, heads)

    rows = (query_block * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)).to(tl.int64)
    row_ok = rows < num_queries
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_DQK)
    do = load_rows(DO + b * stride_dob + h * stride_doh, rows, row_ok, stride_dom, stride_dod, head_dim_v, BLOCK_DV)
    lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)

    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_OUTER, BLOCK_DQK], dtype=tl.float32)
    causal_offset = num_keys - num_queries
    end_query = tl.minimum(query_block * BLOCK_OUTER + BLOCK_OUTER, num_queries)
    key_start, key_end = keys_of_query_block(PAD + b * stride_pb, end_query, chunk, keys_per_chunk, num_keys,
                                             stride_pn, causal_offset, HAS_MASK, CAUSAL)
    for block_start in range(key_start, key_end, BLOCK_INNER):
        keys = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        key_ok = usable_keys(PAD + b * stride_pb, keys, key_end, stride_pn, HAS_MASK)
        k = load_rows(k_ptr, keys, key_ok, stride_kn, stride_kd, head_dim_qk, BLOCK_DQK)
        v = load_rows(v_ptr, keys, key_ok, stride_vn, stride_vd, head_dim_v, BLOCK_DV)
        _, _, dq = query_rows_gradients(q, do, rows, lse, delta, k, v, keys, key_ok, dq, causal_offset, qk_scale_log2,
                                        CAUSAL, DOT_PRECISION)

    store_rows(DQ + chunk * stride_dqc + b * stride_dqb + h * stride_dqh, dq * scale, rows, row_ok,
                stride_dqm, stride_dqd, head_dim_qk, BLOCK_DQK)
