"""Backward kernels for wide heads (Triton): head dims above 256, up to 1280, any Dqk != Dv.

The math and structure of the general backward (attention_bwd.py: Delta first, then
dK/dV over key blocks and dQ over query blocks, each optionally chunked over what it
sums, partials summed afterwards in a fixed order), tiled over the head dims as the
wide forward is (attention_fwd_wide.py):

- the scores S = Q K^T and dP = dO V^T are summed over chunks of BLOCK_CHUNK_QK and
  BLOCK_CHUNK_V channels (common.dot_rows_t), Delta over chunks of BLOCK_DV, so no
  operand is held whole;
- each program owns one slice of BLOCK_SLICE channels of what it writes, and keeps only
  that slice's fp32 accumulator. attention_bwd_wide_dkdv_kernel: slice s of dK (when
  Dqk reaches it) and slice s of dV (when Dv does), max(Dqk, Dv) / BLOCK_SLICE slices;
  a slice beyond Dqk skips dP, whose only use is dK. attention_bwd_wide_dq_kernel:
  slice s of dQ, Dqk / BLOCK_SLICE slices.

Each slice recomputes the scores (and, where it writes dK or dQ, dP). Per (query, key)
pair the multiply-adds are, with S_k and S_v slices of Dqk and Dv and S = max of both,
S Dqk + Dv (dV) + S_k (Dqk + Dv) + Dqk (dK) + S_k (Dqk + Dv) + Dqk (dQ), against
4 Dqk + 3 Dv for the narrow kernels; keeping the slices together in one program would
need every accumulator in registers at once, which is what the slices avoid.

No atomics: every element of dQ, dK, dV is written by exactly one program per chunk.
Padding keys get P = 0 and rows without keys P = 0 (lse = -inf, taken against +inf),
so their gradients are exactly 0.
"""

import triton
import triton.language as tl

from .common import (dot_rows_t, keys_of_query_block, load_rows, program_coordinates, queries_of_key_block, row_stats,
                     store_rows, usable_keys)


@triton.jit
def attention_bwd_wide_delta_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    heads, num_queries, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Delta_i = sum_d dO_id * O_id of attention_bwd_delta_kernel, summed
    over chunks of BLOCK_DV channels: a Dv of 1280 would not fit one tile's registers."""
    tile, _, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M), 1, heads)
    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    out_ptr = OUT + b * stride_ob + h * stride_oh
    do_ptr = DO + b * stride_dob + h * stride_doh
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for chunk_start in range(0, head_dim_v, BLOCK_DV):
        width = head_dim_v - chunk_start
        out = load_rows(out_ptr + chunk_start * stride_od, rows, row_ok, stride_om, stride_od, width,
                        BLOCK_DV).to(tl.float32)
        dout = load_rows(do_ptr + chunk_start * stride_dod, rows, row_ok, stride_dom, stride_dod, width,
                         BLOCK_DV).to(tl.float32)
        delta += tl.sum(dout * out, 1)
    tl.store(DELTA + bh * num_queries + rows, delta, mask=row_ok)


@triton.jit
def attention_bwd_wide_dkdv_kernel(
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
    HAS_MASK: tl.constexpr, BLOCK_CHUNK_QK: tl.constexpr, BLOCK_CHUNK_V: tl.constexpr, BLOCK_SLICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Slice s of dK and of dV for BLOCK_OUTER keys over one chunk of the queries; DK/DV[chunk]
    receive them. CAUSAL as in attention_bwd_dkdv_kernel."""
    num_slices = tl.cdiv(tl.maximum(head_dim_qk, head_dim_v), BLOCK_SLICE)
    block, chunk, bh, b, h = program_coordinates(tl.cdiv(num_keys, BLOCK_OUTER) * num_slices, num_chunks, heads)
    key_block = block // num_slices
    slice_start = block % num_slices * BLOCK_SLICE
    dk_width = head_dim_qk - slice_start  # <= 0: this slice has no dK channels
    dv_width = head_dim_v - slice_start

    keys = (key_block * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)).to(tl.int64)
    key_ok = usable_keys(PAD + b * stride_pb, keys, num_keys, stride_pn, HAS_MASK)
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    do_ptr = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_OUTER, BLOCK_SLICE], dtype=tl.float32)
    dv = tl.zeros([BLOCK_OUTER, BLOCK_SLICE], dtype=tl.float32)
    causal_offset = num_keys - num_queries
    query_start, query_end = queries_of_key_block(key_ok, key_block * BLOCK_OUTER, chunk, queries_per_chunk,
                                                  num_queries, causal_offset, HAS_MASK, CAUSAL)
    for block_start in range(query_start, query_end, BLOCK_INNER):
        rows = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        row_ok = rows < query_end
        lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)
        # Transposed scores (keys x queries), so that P^T dO and dS^T Q need no transposes.
        t = dot_rows_t(tl.zeros([BLOCK_OUTER, BLOCK_INNER], dtype=tl.float32), k_ptr, keys, key_ok, stride_kn,
                       stride_kd, q_ptr, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_CHUNK_QK, DOT_PRECISION)
        t = t * qk_scale_log2
        visible = key_ok[:, None]
        if CAUSAL:
            visible = visible & (keys[:, None] <= rows[None, :] + causal_offset)
        p = tl.where(visible, tl.math.exp2(t - lse[None, :]), 0.0)
        if dv_width > 0:
            do = load_rows(do_ptr + slice_start * stride_dod, rows, row_ok, stride_dom, stride_dod, dv_width,
                           BLOCK_SLICE)
            dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
        if dk_width > 0:
            dp = dot_rows_t(tl.zeros([BLOCK_OUTER, BLOCK_INNER], dtype=tl.float32), v_ptr, keys, key_ok, stride_vn,
                            stride_vd, do_ptr, rows, row_ok, stride_dom, stride_dod, head_dim_v, BLOCK_CHUNK_V,
                            DOT_PRECISION)
            ds = p * (dp - delta[None, :])
            q = load_rows(q_ptr + slice_start * stride_qd, rows, row_ok, stride_qm, stride_qd, dk_width, BLOCK_SLICE)
            dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)

    # A slice past Dqk (or Dv) has no channels there: width <= 0 stores nothing.
    written = keys < num_keys
    store_rows(DK + chunk * stride_dkc + b * stride_dkb + h * stride_dkh + slice_start * stride_dkd, dk * scale,
               keys, written, stride_dkn, stride_dkd, dk_width, BLOCK_SLICE)
    store_rows(DV + chunk * stride_dvc + b * stride_dvb + h * stride_dvh + slice_start * stride_dvd, dv,
               keys, written, stride_dvn, stride_dvd, dv_width, BLOCK_SLICE)


@triton.jit
def attention_bwd_wide_dq_kernel(
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
    HAS_MASK: tl.constexpr, BLOCK_CHUNK_QK: tl.constexpr, BLOCK_CHUNK_V: tl.constexpr, BLOCK_SLICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Slice s of dQ for BLOCK_OUTER queries over one chunk of the keys; DQ[chunk] receives it.
    CAUSAL as in attention_bwd_dq_kernel."""
    num_slices = tl.cdiv(head_dim_qk, BLOCK_SLICE)
    block, chunk, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_OUTER) * num_slices, num_chunks, heads)
    query_block = block // num_slices
    slice_start = block % num_slices * BLOCK_SLICE

    rows = (query_block * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)).to(tl.int64)
    row_ok = rows < num_queries
    lse, delta = row_stats(LSE + bh * num_queries, DELTA + bh * num_queries, rows, row_ok)
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    do_ptr = DO + b * stride_dob + h * stride_doh
    dq = tl.zeros([BLOCK_OUTER, BLOCK_SLICE], dtype=tl.float32)
    causal_offset = num_keys - num_queries
    end_query = tl.minimum(query_block * BLOCK_OUTER + BLOCK_OUTER, num_queries)
    key_start, key_end = keys_of_query_block(PAD + b * stride_pb, end_query, chunk, keys_per_chunk, num_keys,
                                             stride_pn, causal_offset, HAS_MASK, CAUSAL)
    for block_start in range(key_start, key_end, BLOCK_INNER):
        keys = (block_start + tl.arange(0, BLOCK_INNER)).to(tl.int64)
        key_ok = usable_keys(PAD + b * stride_pb, keys, key_end, stride_pn, HAS_MASK)
        t = dot_rows_t(tl.zeros([BLOCK_OUTER, BLOCK_INNER], dtype=tl.float32), q_ptr, rows, row_ok, stride_qm,
                       stride_qd, k_ptr, keys, key_ok, stride_kn, stride_kd, head_dim_qk, BLOCK_CHUNK_QK, DOT_PRECISION)
        t = t * qk_scale_log2
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
        p = tl.where(visible, tl.math.exp2(t - lse[:, None]), 0.0)
        dp = dot_rows_t(tl.zeros([BLOCK_OUTER, BLOCK_INNER], dtype=tl.float32), do_ptr, rows, row_ok, stride_dom,
                        stride_dod, v_ptr, keys, key_ok, stride_vn, stride_vd, head_dim_v, BLOCK_CHUNK_V, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        k = load_rows(k_ptr + slice_start * stride_kd, keys, key_ok, stride_kn, stride_kd, head_dim_qk - slice_start,
                      BLOCK_SLICE)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    store_rows(DQ + chunk * stride_dqc + b * stride_dqb + h * stride_dqh + slice_start * stride_dqd, dq * scale,
               rows, row_ok, stride_dqm, stride_dqd, head_dim_qk - slice_start, BLOCK_SLICE)
