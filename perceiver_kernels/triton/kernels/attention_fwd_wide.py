"""Forward kernels for wide heads (Triton): head dims above 256, up to 1280, any Dqk != Dv.

The narrow kernels (attention_fwd.py) hold a query tile's q and its fp32 output
accumulator whole, each padded to a power of two; past 256 channels that outgrows the
registers and shared memory. These kernels run the same online softmax (the same math,
masks, causal walk, split-KV and merge) tiled over the head dims:

- Q.K^T is summed over chunks of BLOCK_CHUNK_QK channels (common.dot_rows_t): each
  key block reloads its q and k chunk by chunk, so Dqk pads only to a multiple of the chunk
  (261 computes as 320) and no operand is held whole. The q tile is reloaded once per
  key block, from L1/L2 (every key block of a program reads the same rows).
- The output's Dv channels are cut into slices of BLOCK_SLICE, one program each: a
  program keeps a [BLOCK_M, BLOCK_SLICE] fp32 accumulator and recomputes the scores for
  its slice. Per (query, key) pair that is S x Dqk + Dv multiply-adds for S slices
  instead of Dqk + Dv; the alternatives cost more: all of Dv in one program does not
  fit registers past 512 channels (and takes 32-row tiles, no wgmma, well before), and
  two passes (the row statistics first, then each slice's values) compute Q.K^T S + 1
  times. The launcher takes slices as wide as registers allow (tiling.WIDE_FORWARD_SLICE).
- Every slice computes m, l and lse with the same operations in the same order, so
  they agree bit for bit; the slice at channel 0 alone writes lse.

Programs enumerate slices fastest, so the slices of one query tile run together and
share its q and K/V reads in L2. Offsets are int64; every load and store is masked.
"""

import triton
import triton.language as tl

from .attention_fwd import key_walk, online_softmax, write_rows
from .common import LN2, dot_rows_t, load_rows, program_coordinates, usable_keys


@triton.jit
def _accumulate_block(
    acc, m_i, l_i, q_ptr, rows, row_ok, stride_qm, stride_qd,
    k_ptr, v_ptr, pad_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    block_start, key_end, head_dim_qk, slice_width, qk_scale_log2, causal_offset,
    HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CHUNK_QK: tl.constexpr, BLOCK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Folds one block of keys into the running softmax state of the program's slice
    (v_ptr points at the slice's first channel, slice_width channels of it are real)."""
    keys = (block_start + tl.arange(0, BLOCK_N)).to(tl.int64)
    key_ok = usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK)
    # Padding keys are never loaded: whatever they hold (even NaN) cannot leak in.
    t = dot_rows_t(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), q_ptr, rows, row_ok, stride_qm, stride_qd,
                   k_ptr, keys, key_ok, stride_kn, stride_kd, head_dim_qk, BLOCK_CHUNK_QK, DOT_PRECISION)
    t = t * qk_scale_log2
    visible = key_ok[None, :]
    if DIAGONAL:
        visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
    p, alpha, m_new, l_i = online_softmax(t, visible, m_i, l_i)
    v = load_rows(v_ptr, keys, key_ok, stride_vn, stride_vd, slice_width, BLOCK_SLICE)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _accumulate_keys(
    acc, m_i, l_i, q_ptr, rows, row_ok, stride_qm, stride_qd, row_start, row_end,
    k_ptr, v_ptr, pad_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    key_start, key_end, head_dim_qk, slice_width, qk_scale_log2, causal_offset,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CHUNK_QK: tl.constexpr, BLOCK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Folds keys [key_start, key_end) into the state of rows [row_start, row_end), in the
    order of attention_fwd.key_walk (kept range, causal reach, diagonal blocks last)."""
    key_start, full_end, key_end = key_walk(pad_ptr, key_start, key_end, row_start, row_end, stride_pad_n,
                                            causal_offset, HAS_MASK, CAUSAL, BLOCK_N)
    for block_start in range(key_start, full_end, BLOCK_N):
        acc, m_i, l_i = _accumulate_block(
            acc, m_i, l_i, q_ptr, rows, row_ok, stride_qm, stride_qd, k_ptr, v_ptr, pad_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n, block_start, key_end, head_dim_qk, slice_width,
            qk_scale_log2, causal_offset, HAS_MASK, False, BLOCK_M, BLOCK_N, BLOCK_CHUNK_QK, BLOCK_SLICE,
            DOT_PRECISION)
    if CAUSAL:
        for block_start in range(full_end, key_end, BLOCK_N):
            acc, m_i, l_i = _accumulate_block(
                acc, m_i, l_i, q_ptr, rows, row_ok, stride_qm, stride_qd, k_ptr, v_ptr, pad_ptr,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n, block_start, key_end, head_dim_qk,
                slice_width, qk_scale_log2, causal_offset, HAS_MASK, True, BLOCK_M, BLOCK_N, BLOCK_CHUNK_QK,
                BLOCK_SLICE, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def attention_fwd_wide_kernel(
    Q, K, V, PAD, RES, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_CHUNK_QK: tl.constexpr, BLOCK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (Dv slice, query tile, batch*head), all keys; writes its slice of
    out, and lse (B, H, Nq) from the first slice."""
    num_slices = tl.cdiv(head_dim_v, BLOCK_SLICE)
    block, _, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M) * num_slices, 1, heads)
    tile = block // num_slices
    slice_start = block % num_slices * BLOCK_SLICE

    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    acc = tl.zeros([BLOCK_M, BLOCK_SLICE], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _accumulate_keys(
        acc, m_i, l_i, Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd,
        tile * BLOCK_M, tl.minimum(tile * BLOCK_M + BLOCK_M, num_queries),
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh + slice_start * stride_vd,
        PAD + b * stride_pb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        0, num_keys, head_dim_qk, head_dim_v - slice_start, qk_scale_log2, num_keys - num_queries,
        HAS_MASK, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_CHUNK_QK, BLOCK_SLICE, DOT_PRECISION,
    )
    write_rows(
        acc, m_i, l_i, rows, row_ok, rows < tl.where(slice_start == 0, num_queries, 0),
        OUT + b * stride_ob + h * stride_oh + slice_start * stride_od, stride_om, stride_od,
        RES + b * stride_rb + h * stride_rh + slice_start * stride_rd, stride_rm, stride_rd,
        LSE + bh * num_queries, 1,
        head_dim_v - slice_start, LN2, HAS_RESIDUAL, BLOCK_SLICE,
    )


@triton.jit
def attention_fwd_wide_split_kernel(
    Q, K, V, PAD, PART_OUT, PART_LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
    num_splits, keys_per_split,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_CHUNK_QK: tl.constexpr, BLOCK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (Dv slice, query tile, key chunk, batch*head).

    Writes its slice of the chunk's normalised fp32 partial output to PART_OUT (B*H, S,
    Nq, Dv) and, from the first slice, the chunk's lse in base 2 to PART_LSE (B*H, S,
    Nq), both contiguous; attention_fwd.merge_splits_kernel combines them. HAS_RESIDUAL
    is only part of the tuning key here: the merge adds the residual.
    """
    num_slices = tl.cdiv(head_dim_v, BLOCK_SLICE)
    block, chunk, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M) * num_slices, num_splits, heads)
    tile = block // num_slices
    slice_start = block % num_slices * BLOCK_SLICE

    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    key_start = chunk * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, num_keys)
    acc = tl.zeros([BLOCK_M, BLOCK_SLICE], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _accumulate_keys(
        acc, m_i, l_i, Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd,
        tile * BLOCK_M, tl.minimum(tile * BLOCK_M + BLOCK_M, num_queries),
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh + slice_start * stride_vd,
        PAD + b * stride_pb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        key_start, key_end, head_dim_qk, head_dim_v - slice_start, qk_scale_log2, num_keys - num_queries,
        HAS_MASK, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_CHUNK_QK, BLOCK_SLICE, DOT_PRECISION,
    )
    part = bh * num_splits + chunk
    write_rows(
        acc, m_i, l_i, rows, row_ok, rows < tl.where(slice_start == 0, num_queries, 0),
        PART_OUT + part * num_queries * head_dim_v + slice_start, head_dim_v, 1,
        PART_OUT, 0, 0,
        PART_LSE + part * num_queries, 1,
        head_dim_v - slice_start, 1.0, False, BLOCK_SLICE,
    )
