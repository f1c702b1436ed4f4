"""Forward kernel for wide heads that computes each score once (Triton): Dqk and Dv above
256 channels, up to 512.

The math is attention_fwd.py's online softmax in base 2 (same masks, causal walk, rows
without keys, split-KV and merge); what changes is how a head of up to 512 channels is
tiled:

- Q.K^T sums over Dqk in up to three power-of-two chunks of constexpr widths
  DQK0 >= DQK1 >= DQK2 (0: absent), each at an offset that is a multiple of its width:
  272 = 256 + 16, 336 = 256 + 64 + 16, 512 = 256 + 256. The query tile's chunks are
  loaded once, before the key walk; each key block loads its K chunks and chains the
  dots into one fp32 score tile:  t = q0.k0^T + q1.k1^T + q2.k2^T.
- A program's slice of Dv (all of it, unless its accumulators would outgrow the
  registers: the launcher cuts Dv = 512 in two slices of 256) is up to three chunks
  DV0 >= DV1 >= DV2 the same way, each with its own fp32 accumulator, and every one of
  them takes the same P:  acc_c = alpha * acc_c + P.v_c.
  So each (query, key) pair costs Dqk + Dv multiply-adds (S x Dqk + Dv for S slices),
  against S x Dqk + Dv with S = Dv / 128 in the timed wide kernels
  (attention_fwd_wide.py).
- Channels past a head dim (a chunk reaching beyond it) read as zeros, so a head dim
  that is no sum of three powers of two computes as the next one that is (480 as 512).

Loads come from TMA descriptors (USE_TMA: host-side 4-d descriptors over (B, H, N, D),
whatever the strides, with zeros outside each dimension) or through pointers masked on
rows and channels. A TMA block of keys is loaded whole, padding keys included: their
scores are masked like any hidden key's; with a mask, V is read through pointers, which
never load a padding key (0 x NaN in P.V would be NaN).

One program per (Dv slice, query tile, key chunk, batch*head); programs enumerate
slices fastest, then query tiles, so the programs of one head and key chunk run together
and share its Q and K/V in L2. Unsplit (SPLIT false) a program writes out (+ residual)
and lse; split, it writes its chunk's normalised fp32 partial and base-2 lse, which
attention_fwd.merge_splits_kernel combines. Offsets are int64; every pointer load and
store is masked.
"""

import triton
import triton.language as tl

from .attention_fwd import key_walk, online_softmax, write_rows
from .common import LN2, head_start, load_rows, program_coordinates, usable_keys

# The widest piece of the output the epilogue writes at once (see _write_chunk).
EPILOGUE_CHANNELS = tl.constexpr(32)


@triton.jit
def _block(src, b, h, first_row, rows, row_ok, stride_row, stride_d, column, dim,
           BLOCK_ROWS: tl.constexpr, WIDTH: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [first_row, first_row + BLOCK_ROWS) x channels [column, column + WIDTH) of one
    (batch, head)'s matrix: from a 4-d descriptor (zeros outside the tensor), or from a
    pointer at the (batch, head)'s start, masked on row_ok and channels below dim."""
    if USE_TMA:
        block = src.load([b.to(tl.int32), h.to(tl.int32), first_row, column]).reshape([BLOCK_ROWS, WIDTH])
    else:
        block = load_rows(src + column * stride_d, rows, row_ok, stride_row, stride_d, dim - column, WIDTH)
    return block


@triton.jit
def _query_chunk(src, b, h, first_row, rows, row_ok, stride_row, stride_d, column, dim,
                 BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, USE_TMA: tl.constexpr):
    """A chunk of the query tile, or a 16-wide stand-in where the chunk is absent (WIDTH 0;
    never read)."""
    if WIDTH > 0:
        chunk = _block(src, b, h, first_row, rows, row_ok, stride_row, stride_d, column, dim, BLOCK_M, WIDTH,
                       USE_TMA)
    else:
        chunk = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    return chunk


@triton.jit
def _scores_chunk(t, q, k_src, b, h, block_start, keys, key_ok, stride_kn, stride_kd, column, qk_width,
                  BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """t + q.k^T over one chunk of Dqk (t unchanged where the chunk is absent)."""
    if WIDTH > 0:
        k = _block(k_src, b, h, block_start, keys, key_ok, stride_kn, stride_kd, column, qk_width, BLOCK_N,
                   WIDTH, USE_TMA)
        t = tl.dot(q, tl.trans(k), t, input_precision=DOT_PRECISION)
    return t


@triton.jit
def _value_chunk(acc, p, alpha, v_src, b, h, block_start, keys, key_ok, stride_vn, stride_vd, column, v_width,
                 BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """alpha * acc + P.v over one chunk of Dv (acc unchanged where the chunk is absent)."""
    if WIDTH > 0:
        v = _block(v_src, b, h, block_start, keys, key_ok, stride_vn, stride_vd, column, v_width, BLOCK_N,
                   WIDTH, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _accumulate_block(
    acc0, acc1, acc2, m_i, l_i, q0, q1, q2, rows, b, h,
    k0_src, k1_src, k2_src, v0_src, v1_src, v2_src, pad_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    block_start, key_end, qk_width, v_width, slice_start, qk_scale_log2, causal_offset,
    HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQK0: tl.constexpr, DQK1: tl.constexpr, DQK2: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    DV2: tl.constexpr, USE_TMA: tl.constexpr, V_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Folds one block of keys into the running state: the scores once, over every Dqk
    chunk, then P into the accumulator of every Dv chunk of the program's slice (from
    channel slice_start). DIAGONAL: the block crosses the causal diagonal, so each
    (row, key) is checked against it."""
    keys = (block_start + tl.arange(0, BLOCK_N)).to(tl.int64)
    key_ok = usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK)
    t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t = _scores_chunk(t, q0, k0_src, b, h, block_start, keys, key_ok, stride_kn, stride_kd, 0, qk_width,
                      BLOCK_N, DQK0, USE_TMA, DOT_PRECISION)
    t = _scores_chunk(t, q1, k1_src, b, h, block_start, keys, key_ok, stride_kn, stride_kd, DQK0, qk_width,
                      BLOCK_N, DQK1, USE_TMA, DOT_PRECISION)
    t = _scores_chunk(t, q2, k2_src, b, h, block_start, keys, key_ok, stride_kn, stride_kd, DQK0 + DQK1,
                      qk_width, BLOCK_N, DQK2, USE_TMA, DOT_PRECISION)
    visible = key_ok[None, :]
    if DIAGONAL:
        visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
    p, alpha, m_new, l_i = online_softmax(t * qk_scale_log2, visible, m_i, l_i)
    acc0 = _value_chunk(acc0, p, alpha, v0_src, b, h, block_start, keys, key_ok, stride_vn, stride_vd, slice_start,
                        v_width, BLOCK_N, DV0, V_TMA, DOT_PRECISION)
    acc1 = _value_chunk(acc1, p, alpha, v1_src, b, h, block_start, keys, key_ok, stride_vn, stride_vd,
                        slice_start + DV0, v_width, BLOCK_N, DV1, V_TMA, DOT_PRECISION)
    acc2 = _value_chunk(acc2, p, alpha, v2_src, b, h, block_start, keys, key_ok, stride_vn, stride_vd,
                        slice_start + DV0 + DV1, v_width, BLOCK_N, DV2, V_TMA, DOT_PRECISION)
    return acc0, acc1, acc2, m_new, l_i


@triton.jit
def _write_chunk(acc, m_i, l_i, rows, row_ok, lse_ok, out_ptr, stride_om, stride_od, res_ptr, stride_rm, stride_rd,
                 lse_ptr, column, head_dim_v, LSE_UNIT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 WIDTH: tl.constexpr):
    """write_rows for the WIDTH channels of the output from `column` (nothing where WIDTH is
    0), in halves down to EPILOGUE_CHANNELS: a whole 256-channel tile with its residual
    and their addresses, beside the accumulators still to be written, spilled at 272
    and 336 channels. The halves are the accumulator's own registers, regrouped."""
    if WIDTH > EPILOGUE_CHANNELS:
        first, second = tl.split(tl.permute(tl.reshape(acc, [acc.shape[0], 2, WIDTH // 2]), (0, 2, 1)))
        _write_chunk(first, m_i, l_i, rows, row_ok, lse_ok, out_ptr, stride_om, stride_od, res_ptr, stride_rm,
                     stride_rd, lse_ptr, column, head_dim_v, LSE_UNIT, HAS_RESIDUAL, WIDTH // 2)
        _write_chunk(second, m_i, l_i, rows, row_ok, rows < 0, out_ptr, stride_om, stride_od, res_ptr, stride_rm,
                     stride_rd, lse_ptr, column + WIDTH // 2, head_dim_v, LSE_UNIT, HAS_RESIDUAL, WIDTH // 2)
    elif WIDTH > 0:
        write_rows(acc, m_i, l_i, rows, row_ok, lse_ok, out_ptr + column * stride_od, stride_om, stride_od,
                   res_ptr + column * stride_rd, stride_rm, stride_rd, lse_ptr, 1, head_dim_v - column, LSE_UNIT,
                   HAS_RESIDUAL, WIDTH)


@triton.jit
def wide_fwd_kernel(
    Q0, Q1, Q2, K0, K1, K2, V0, V1, V2, PAD, RES, OUT, LSE,
    q_strides, k_strides, v_strides, pad_strides, res_strides, out_strides,
    heads, num_queries, num_keys, qk_width, head_dim_v, v_width, qk_scale_log2,
    num_splits, keys_per_split,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    DQK0: tl.constexpr, DQK1: tl.constexpr, DQK2: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    DV2: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (slice of Dv, query tile, key chunk, batch*head) over keys
    [chunk * keys_per_split, + keys_per_split); a slice is DV0 + DV1 + DV2 channels (one
    slice, all of Dv, unless its accumulators outgrow the registers).

    Q0..Q2, K0..K2, V0..V2: with USE_TMA, the 4-d descriptors over (B, H, N, D) of each
    chunk's block (a chunk's width is its descriptor's block width); else q, k and v
    each three times, read through pointers with their strides. qk_width and v_width:
    the channels of a row the loads read (the head dims, or the widths of the launcher's
    zero-padded copies); head_dim_v: the channels written. Unsplit (SPLIT false,
    one chunk of all keys): writes OUT (+ RES) and LSE (B, H, Nq), natural log. Split:
    OUT is the fp32 partial output (B*H, S, Nq, Dv) and LSE the base-2 partial lse
    (B*H, S, Nq), both contiguous (RES unread: the merge adds it).
    """
    num_slices = tl.cdiv(head_dim_v, DV0 + DV1 + DV2)
    block, chunk, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M) * num_slices, num_splits, heads)
    tile = block // num_slices
    slice_start = block % num_slices * (DV0 + DV1 + DV2)
    first_query = tile * BLOCK_M
    rows = (first_query + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    if USE_TMA:
        q0_src, q1_src, q2_src = Q0, Q1, Q2
        k0_src, k1_src, k2_src = K0, K1, K2
    else:
        q0_src = head_start(Q0, q_strides, b, h)
        k0_src = head_start(K0, k_strides, b, h)
        q1_src, q2_src, k1_src, k2_src = q0_src, q0_src, k0_src, k0_src
    # With a mask, V comes through pointers even where TMA could read it: a TMA block holds
    # the padding keys' rows, and NaN there would reach P.V (0 x NaN); masked pointer
    # loads (asynchronous copies filling zeros once pipelined) never read them. K's
    # padding rows only reach scores that the mask hides.
    V_TMA: tl.constexpr = False if HAS_MASK else USE_TMA
    if V_TMA:
        v0_src, v1_src, v2_src = V0, V1, V2
    else:
        v0_src = head_start(V0, v_strides, b, h)
        v1_src, v2_src = v0_src, v0_src
    q0 = _query_chunk(q0_src, b, h, first_query, rows, row_ok, q_strides[2], q_strides[3], 0, qk_width, BLOCK_M,
                      DQK0, USE_TMA)
    q1 = _query_chunk(q1_src, b, h, first_query, rows, row_ok, q_strides[2], q_strides[3], DQK0, qk_width, BLOCK_M,
                      DQK1, USE_TMA)
    q2 = _query_chunk(q2_src, b, h, first_query, rows, row_ok, q_strides[2], q_strides[3], DQK0 + DQK1, qk_width,
                      BLOCK_M, DQK2, USE_TMA)
    acc0 = tl.zeros([BLOCK_M, DV0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, DV1 if DV1 > 0 else 16], dtype=tl.float32)  # a stand-in where absent
    acc2 = tl.zeros([BLOCK_M, DV2 if DV2 > 0 else 16], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    causal_offset = num_keys - num_queries
    pad_ptr = PAD + b * pad_strides[0]
    key_start, full_end, key_end = key_walk(
        pad_ptr, chunk * keys_per_split, tl.minimum(chunk * keys_per_split + keys_per_split, num_keys),
        first_query, tl.minimum(first_query + BLOCK_M, num_queries), pad_strides[1], causal_offset, HAS_MASK, CAUSAL,
        BLOCK_N)
    for block_start in range(key_start, full_end, BLOCK_N):
        acc0, acc1, acc2, m_i, l_i = _accumulate_block(
            acc0, acc1, acc2, m_i, l_i, q0, q1, q2, rows, b, h, k0_src, k1_src, k2_src, v0_src, v1_src, v2_src,
            pad_ptr, k_strides[2], k_strides[3], v_strides[2], v_strides[3], pad_strides[1], block_start, key_end,
            qk_width, v_width, slice_start, qk_scale_log2, causal_offset, HAS_MASK, False, BLOCK_M, BLOCK_N, DQK0, DQK1,
            DQK2, DV0, DV1, DV2, USE_TMA, V_TMA, DOT_PRECISION)
    if CAUSAL:
        for block_start in range(full_end, key_end, BLOCK_N):
            acc0, acc1, acc2, m_i, l_i = _accumulate_block(
                acc0, acc1, acc2, m_i, l_i, q0, q1, q2, rows, b, h, k0_src, k1_src, k2_src, v0_src, v1_src, v2_src,
                pad_ptr, k_strides[2], k_strides[3], v_strides[2], v_strides[3], pad_strides[1], block_start, key_end,
                qk_width, v_width, slice_start, qk_scale_log2, causal_offset, HAS_MASK, True, BLOCK_M, BLOCK_N, DQK0,
                DQK1, DQK2, DV0, DV1, DV2, USE_TMA, V_TMA, DOT_PRECISION)

    if SPLIT:
        part = bh * num_splits + chunk
        out_ptr, out_row_stride, out_channel_stride = OUT + part * num_queries * head_dim_v, head_dim_v, 1
        lse_ptr = LSE + part * num_queries
        res_ptr, res_row_stride, res_channel_stride = OUT, 0, 0
    else:
        out_ptr = head_start(OUT, out_strides, b, h)
        out_row_stride, out_channel_stride = out_strides[2], out_strides[3]
        lse_ptr = LSE + bh * num_queries
        res_ptr = head_start(RES, res_strides, b, h)
        res_row_stride, res_channel_stride = res_strides[2], res_strides[3]
    lse_unit: tl.constexpr = 1.0 if SPLIT else LN2
    has_residual: tl.constexpr = False if SPLIT else HAS_RESIDUAL
    # Of a row's slices and chunks, the first writes its lse.
    lse_ok = rows < tl.where(slice_start == 0, num_queries, 0)
    no_lse = rows < 0
    _write_chunk(acc0, m_i, l_i, rows, row_ok, lse_ok, out_ptr, out_row_stride, out_channel_stride, res_ptr,
                 res_row_stride, res_channel_stride, lse_ptr, slice_start, head_dim_v, lse_unit, has_residual, DV0)
    _write_chunk(acc1, m_i, l_i, rows, row_ok, no_lse, out_ptr, out_row_stride, out_channel_stride, res_ptr,
                 res_row_stride, res_channel_stride, lse_ptr, slice_start + DV0, head_dim_v, lse_unit, has_residual,
                 DV1)
    _write_chunk(acc2, m_i, l_i, rows, row_ok, no_lse, out_ptr, out_row_stride, out_channel_stride, res_ptr,
                 res_row_stride, res_channel_stride, lse_ptr, slice_start + DV0 + DV1, head_dim_v, lse_unit,
                 has_residual, DV2)
