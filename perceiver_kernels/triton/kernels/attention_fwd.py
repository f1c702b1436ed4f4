"""Forward kernels of fused cross-attention (Triton).

Math, for one batch b, head h and query row i over the keys j that are not padding:

    s_ij  = scale * <q_i, k_j>
    out_i = sum_j softmax_j(s_ij) v_j  (+ residual_i)
    lse_i = log sum_j exp(s_ij)

computed with the online softmax in base 2 (exp2 is the native instruction): with
t_ij = s_ij * log2(e), each program keeps a running max m_i, a running sum
l_i = sum_j 2^(t_ij - m_i) and an fp32 accumulator acc_i = sum_j 2^(t_ij - m_i) v_j;
when the max grows to m', acc and l are rescaled by 2^(m - m'). At the end
out_i = acc_i / l_i and lse_i = (m_i + log2 l_i) * ln 2.

Two grids serve the two Perceiver IO shapes:
- attention_fwd_kernel: one program per (query tile, batch*head) walking all keys.
  This is the DECODE shape (many queries, few latents): the latents' K/V are shared
  by every program of a head and stay in L2, each program streams its queries in and
  its outputs out once. It is also used for ENCODE shapes that fill the GPU unsplit.
- attention_fwd_split_kernel + merge_splits_kernel: split-KV for the ENCODE shape
  (few latent queries, very many inputs). Each program takes one contiguous chunk of
  the keys and writes a normalised fp32 partial o_s with its lse_s (base 2); the merge
  computes LSE = log2 sum_s 2^lse_s and out = sum_s 2^(lse_s - LSE) o_s with the same
  running-max recurrence, then applies the residual.

With CAUSAL, row i sees only keys j <= i + Nk - Nq (aligned at the bottom right); key
blocks beyond a tile's reach are skipped, not masked.

Rows whose keys are all padding keep m = -inf and l = 0: exponents are taken
against a stand-in max of 0 so no NaN appears, and the epilogue writes out = 0
(+ residual) and lse = -inf. Offsets are int64 (B*H*Nk*D can exceed 2^31); every
load and store is masked, so any Nq, Nk and head dim (padded to a power of two
inside) work, with any strides.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .common import LN2, kept_key_range, load_rows, program_coordinates, usable_keys


@triton.jit
def online_softmax(t, visible, m_i, l_i):
    """One step of the online softmax over scores t (base 2) where `visible`:
    (p, alpha, m_new, l_new); the caller rescales its accumulator by alpha and adds p @ v."""
    t = tl.where(visible, t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(t - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def key_walk(pad_ptr, key_start, key_end, row_start, row_end, stride_pad_n, causal_offset,
             HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first key, end of the blocks every row sees whole, end) of the keys [key_start,
    key_end) that query rows [row_start, row_end) visit.

    CAUSAL: row i sees keys j <= i + causal_offset (causal_offset = Nk - Nq). Blocks past
    the last row's reach are never visited; blocks every row sees entirely run without a
    per-element check; only the blocks across the diagonal, [full end, end), check each
    (row, key). Without CAUSAL every block is full.
    """
    key_start, key_end = kept_key_range(pad_ptr, key_start, key_end, stride_pad_n, HAS_MASK)
    full_end = key_end
    if CAUSAL:
        key_end = tl.minimum(key_end, row_end + causal_offset)
        seen_by_all = row_start + causal_offset + 1  # keys below it are visible to every row
        full_end = tl.minimum(key_end, key_start + tl.maximum(seen_by_all - key_start, 0) // BLOCK_N * BLOCK_N)
    return key_start, full_end, key_end


@triton.jit
def _accumulate_block(
    acc, m_i, l_i, q, rows,
    k_ptr, v_ptr, pad_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    block_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2, causal_offset,
    HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Folds one block of keys into the running softmax state. DIAGONAL: the block crosses
    the causal diagonal, so each (row, key) is checked against it."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    keys = (block_start + tl.arange(0, BLOCK_N)).to(tl.int64)
    key_ok = usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK)
    # Padding keys are never loaded: whatever they hold (even NaN) cannot leak in.
    k_t = tl.load(k_ptr + keys[None, :] * stride_kn + offs_dqk[:, None] * stride_kd,
                  mask=key_ok[None, :] & (offs_dqk < head_dim_qk)[:, None], other=0.0)
    t = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2
    visible = key_ok[None, :]
    if DIAGONAL:
        visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
    p, alpha, m_new, l_i = online_softmax(t, visible, m_i, l_i)
    v = tl.load(v_ptr + keys[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=key_ok[:, None] & (offs_dv < head_dim_v)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _accumulate_keys(
    acc, m_i, l_i, q, rows, row_start, row_end,
    k_ptr, v_ptr, pad_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    key_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2, causal_offset,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Folds keys [key_start, key_end) of one (batch, head) into the running softmax state
    of query rows [row_start, row_end), in the order of key_walk."""
    key_start, full_end, key_end = key_walk(pad_ptr, key_start, key_end, row_start, row_end, stride_pad_n,
                                            causal_offset, HAS_MASK, CAUSAL, BLOCK_N)
    for block_start in range(key_start, full_end, BLOCK_N):
        acc, m_i, l_i = _accumulate_block(
            acc, m_i, l_i, q, rows, k_ptr, v_ptr, pad_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_pad_n, block_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2, causal_offset,
            HAS_MASK, False, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION)
    if CAUSAL:
        for block_start in range(full_end, key_end, BLOCK_N):
            acc, m_i, l_i = _accumulate_block(
                acc, m_i, l_i, q, rows, k_ptr, v_ptr, pad_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_pad_n, block_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2, causal_offset,
                HAS_MASK, True, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def write_rows(
    acc, m_i, l_i, rows, row_ok, lse_ok,
    out_ptr, stride_om, stride_od,
    res_ptr, stride_rm, stride_rd,
    lse_ptr, stride_lm,
    head_dim_v, LSE_UNIT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Normalises acc, adds the residual, stores out and lse = (m + log2 l) * LSE_UNIT
    (lse only where lse_ok: of a row's several Dv slices, one writes it).

    Rows without a single key (l = 0) get out = 0 (+ residual) and lse = -inf.
    """
    offs_dv = tl.arange(0, BLOCK_DV)
    io_mask = row_ok[:, None] & (offs_dv < head_dim_v)[None, :]
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + offs_dv[None, :] * stride_rd, mask=io_mask, other=0.0)
        out += res.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=io_mask)
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LSE_UNIT, float("-inf"))
    tl.store(lse_ptr + rows * stride_lm, lse, mask=lse_ok)


@triton.jit
def attention_fwd_kernel(
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
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch*head), all keys; writes out and lse (B, H, Nq)."""
    tile, _, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M), 1, heads)

    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_DQK)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _accumulate_keys(
        acc, m_i, l_i, q, rows, tile * BLOCK_M, tl.minimum(tile * BLOCK_M + BLOCK_M, num_queries),
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, PAD + b * stride_pb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        0, num_keys, head_dim_qk, head_dim_v, qk_scale_log2, num_keys - num_queries,
        HAS_MASK, CAUSAL, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION,
    )
    write_rows(
        acc, m_i, l_i, rows, row_ok, row_ok,
        OUT + b * stride_ob + h * stride_oh, stride_om, stride_od,
        RES + b * stride_rb + h * stride_rh, stride_rm, stride_rd,
        LSE + bh * num_queries, 1,
        head_dim_v, LN2, HAS_RESIDUAL, BLOCK_DV,
    )


@triton.jit
def attention_fwd_split_kernel(
    Q, K, V, PAD, PART_OUT, PART_LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
    num_splits, keys_per_split,
    tuning_inner_length,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, key chunk, batch*head).

    Writes the chunk's normalised fp32 partial output to PART_OUT (B*H, S, Nq, Dv) and
    its lse in base 2 to PART_LSE (B*H, S, Nq), both contiguous. HAS_RESIDUAL is only
    part of the tuning key here: the merge adds the residual.
    """
    tile, chunk, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M), num_splits, heads)

    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd, head_dim_qk, BLOCK_DQK)

    key_start = chunk * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, num_keys)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _accumulate_keys(
        acc, m_i, l_i, q, rows, tile * BLOCK_M, tl.minimum(tile * BLOCK_M + BLOCK_M, num_queries),
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, PAD + b * stride_pb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        key_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2, num_keys - num_queries,
        HAS_MASK, CAUSAL, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION,
    )
    part = bh * num_splits + chunk
    write_rows(
        acc, m_i, l_i, rows, row_ok, row_ok,
        PART_OUT + part * num_queries * head_dim_v, head_dim_v, 1,
        PART_OUT, 0, 0,
        PART_LSE + part * num_queries, 1,
        head_dim_v, 1.0, False, BLOCK_DV,
    )


@triton.jit
def merge_splits_kernel(
    PART_OUT, PART_LSE, RES, OUT, LSE,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads, num_queries, head_dim_v, num_splits,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    WAIT_FOR_PRIMARY: tl.constexpr = False,
):
    """Combines the S partials of each row: out = sum_s 2^(lse_s - LSE) o_s, + residual.

    One program per (query tile, slice of BLOCK_DV channels, batch*head): narrow heads
    have one slice (BLOCK_DV >= Dv); wide ones several, so that the fp32 row stays in
    registers, and the slice at channel 0 writes lse.

    WAIT_FOR_PRIMARY (sm_90+, launched with launch_pdl=True after a kernel that lets
    its dependents launch early): the programs may start while the split kernel still
    runs, and wait here until its partials are complete and visible.
    """
    if WAIT_FOR_PRIMARY:
        gdc_wait()
    num_slices = tl.cdiv(head_dim_v, BLOCK_DV)
    block, _, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M) * num_slices, 1, heads)
    tile = block // num_slices
    slice_start = block % num_slices * BLOCK_DV

    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    offs_dv = slice_start + tl.arange(0, BLOCK_DV)
    io_mask = row_ok[:, None] & (offs_dv < head_dim_v)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for chunk in range(0, num_splits):
        part = bh * num_splits + chunk
        lse_s = tl.load(PART_LSE + part * num_queries + rows, mask=row_ok, other=float("-inf"))
        o_s = tl.load(PART_OUT + part * num_queries * head_dim_v + rows[:, None] * head_dim_v + offs_dv[None, :],
                      mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse_s - m_ref)
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    write_rows(
        acc, m_i, l_i, rows, row_ok, rows < tl.where(slice_start == 0, num_queries, 0),
        OUT + b * stride_ob + h * stride_oh + slice_start * stride_od, stride_om, stride_od,
        RES + b * stride_rb + h * stride_rh + slice_start * stride_rd, stride_rm, stride_rd,
        LSE + bh * num_queries, 1,
        head_dim_v - slice_start, LN2, HAS_RESIDUAL, BLOCK_DV,
    )
