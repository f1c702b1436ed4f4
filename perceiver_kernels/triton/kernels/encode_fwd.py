"""ENCODE forward (Triton): all the latent queries of a head in one program, so that
each K/V tile is read from memory once per split.

Math, as in attention_fwd.py (base-2 online softmax): for one batch b, head h and
query row i over the keys j it sees (not padding; causally j <= i + Nk - Nq),

    t_ij  = scale * log2(e) * <q_i, k_j>
    m_i   = max_j t_ij,  l_i = sum_j 2^(t_ij - m_i),  acc_i = sum_j 2^(t_ij - m_i) v_j
    out_i = acc_i / l_i (+ residual_i),  lse_i = (m_i + log2 l_i) * ln 2

kept as running values over key tiles (acc and l rescaled by 2^(m - m') when the
max grows to m'). Rows that see no key keep l = 0 and get 0 (+ residual), lse = -inf.

Grid: (query group, split, batch*head), query groups fastest. A program holds
BLOCK_M query rows (all the latents of its head for Nq <= BLOCK_M) resident and
walks one contiguous split of the keys; where a head has more queries than one
program holds, its groups are adjacent programs walking the same keys at the same
time, so the second read of each K/V tile hits L2 instead of memory. With one split
the program writes the output (residual fused) and lse; with several it writes its
normalised fp32 partial and base-2 lse (B*H, S, Nq, .) for merge_splits_kernel.

The key walk of a program, within its split [key_start, key_end):
- the kept range [lo, hi) of the mask is read from the mask bytes first
  (kept_key_span): tiles outside it are skipped whole;
- whole tiles (inside a kept range without holes, before the causal diagonal of the
  group's first row) run without any per-key check: the scale is applied to the row
  max and folded into the exponent's subtraction (one FMA per score);
- the rest (the tile straddling the end, holes, the causal diagonal) check every key
  (mask bytes, split end) and every (row, key) on the diagonal.
WARP_SPECIALIZE (Hopper, 16 bits, no mask) walks all the tiles in one loop that
Triton splits into a TMA producer warpgroup and two consumer warpgroups of BLOCK_M / 2
rows each, so the softmax of one tile overlaps the matrix products of the next; Triton
3.6 specializes only a kernel with a single loop of dots, so there every tile is whole
(WHOLE_TILES: not causal, every split a multiple of BLOCK_N keys) or every tile is
checked.

Q, K and V come through tensor descriptors (TMA on Hopper, built per program with
tl.make_tensor_descriptor: out-of-bounds rows and channels read as 0) where their
strides allow, through masked pointer loads otherwise; the same kernel, chosen by
KV_DESCRIPTORS. A descriptor loads whole tiles, so in checked tiles under a mask the
V rows of unused keys are zeroed before P @ V: a padding key may hold NaN, and
0 * NaN is NaN. (Scores of unused keys are replaced by -inf before the max, so NaN in
K cannot leak.)

Offsets are int64 (B*H*Nk*D can exceed 2^31); any Nq, Nk, head dim (padded to a power
of two inside) and strides.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .attention_fwd import online_softmax, write_rows
from .common import LN2, head_start, kept_key_span, load_rows, program_coordinates, usable_keys


@triton.jit
def _key_tile(src, keys, key_ok, head_dim, stride_n, stride_d, tile_start,
              CHECKED: tl.constexpr, ZERO_UNUSED: tl.constexpr, KV_DESCRIPTORS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `keys` (from tile_start) x [0, BLOCK_D) channels of K or V, through the
    descriptor `src` or through pointers from `src`; channels past head_dim read 0.

    CHECKED: only the rows key_ok matter. Pointers leave the others unread (they may
    lie past the tensor); a descriptor loads whole tiles (rows past the tensor read 0)
    and, ZERO_UNUSED, zeroes the others: a padding key's V may hold NaN, and 0 * NaN is
    NaN. K needs no zeroing, since the scores of unused keys are replaced by -inf.
    """
    if KV_DESCRIPTORS:
        tile = src.load([tile_start, 0])
        if ZERO_UNUSED:
            tile = tl.where(key_ok[:, None], tile, 0.0)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        in_dim = (offs_d < head_dim)[None, :]
        if CHECKED:
            in_dim = in_dim & key_ok[:, None]
        tile = tl.load(src + keys[:, None] * stride_n + offs_d[None, :] * stride_d, mask=in_dim, other=0.0)
    return tile


@triton.jit
def _whole_tile(
    acc, m_i, l_i, q, k_src, v_src, tile_start,
    stride_kn, stride_kd, stride_vn, stride_vd, head_dim_qk, head_dim_v, qk_scale_log2,
    KV_DESCRIPTORS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Folds one tile of keys that every row sees whole into the running state.

    qk_scale_log2 >= 0 (the kernel negates q for a negative scale), so the tile's max
    of the scaled scores is the scaled max of the scores, and each score costs one FMA
    before its exp2. The max is finite (real scores of at least one key per row), so
    no stand-in is needed.
    """
    keys = (tile_start + tl.arange(0, BLOCK_N)).to(tl.int64)
    k = _key_tile(k_src, keys, keys, head_dim_qk, stride_kn, stride_kd, tile_start, False, False, KV_DESCRIPTORS,
                  BLOCK_DQK)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale_log2)
    p = tl.math.exp2(scores * qk_scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    v = _key_tile(v_src, keys, keys, head_dim_v, stride_vn, stride_vd, tile_start, False, False, KV_DESCRIPTORS,
                  BLOCK_DV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _checked_tile(
    acc, m_i, l_i, q, rows, k_src, v_src, pad_ptr, tile_start, key_end,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n, head_dim_qk, head_dim_v, qk_scale_log2,
    causal_offset,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, KV_DESCRIPTORS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Folds one tile of keys into the running state, checking each key (below key_end,
    not padding) and, CAUSAL, each (row, key) against the diagonal."""
    keys = (tile_start + tl.arange(0, BLOCK_N)).to(tl.int64)
    key_ok = usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK)
    k = _key_tile(k_src, keys, key_ok, head_dim_qk, stride_kn, stride_kd, tile_start, True, False, KV_DESCRIPTORS,
                  BLOCK_DQK)
    t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
    p, alpha, m_new, l_i = online_softmax(t, visible, m_i, l_i)
    v = _key_tile(v_src, keys, key_ok, head_dim_v, stride_vn, stride_vd, tile_start, True, HAS_MASK,
                  KV_DESCRIPTORS, BLOCK_DV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def encode_fwd_kernel(
    Q, K, V, PAD, RES, OUT, LSE, PART_OUT, PART_LSE,
    q_strides, k_strides, v_strides, pad_strides, res_strides, out_strides,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
    num_splits, keys_per_split,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CAUSAL: tl.constexpr, NEGATIVE_SCALE: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_DESCRIPTORS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, PARTIALS: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    """One program per (query group of BLOCK_M rows, key split, batch*head).

    qk_scale_log2 = |scale| * log2(e); NEGATIVE_SCALE negates q instead (exact), so the
    whole tiles can scale the row max. One split writes OUT and LSE (natural log)
    with the residual; PARTIALS (several splits) writes
    PART_OUT and PART_LSE instead (a constexpr: a runtime branch between the two
    epilogues kept Triton 3.6 from warp-specializing the key loop).
    LAUNCH_DEPENDENTS (sm_90+, split): lets the merge, launched with programmatic
    dependent launch, start once every program of this grid has started; it waits for
    this grid's completion before reading (merge_splits_kernel, WAIT_FOR_PRIMARY), so
    only its launch overlaps the last wave.
    """
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    group, split, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M), num_splits, heads)

    row_start = group * BLOCK_M
    row_end = tl.minimum(row_start + BLOCK_M, num_queries)
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    q_base = head_start(Q, q_strides, b, h)
    k_base = head_start(K, k_strides, b, h)
    v_base = head_start(V, v_strides, b, h)
    if KV_DESCRIPTORS:
        # Rows past Nq or Nk and channels past the head dim read 0; the planner checked
        # the strides (16-byte rows, contiguous channels, aligned bases). Q comes
        # through a descriptor too: Triton 3.6's Hopper warp specialization fails to
        # compile the loop when Q is a pointer load.
        q = tl.make_tensor_descriptor(q_base, shape=[num_queries, head_dim_qk], strides=[q_strides[2], 1],
                                      block_shape=[BLOCK_M, BLOCK_DQK]).load([row_start, 0])
        k_src = tl.make_tensor_descriptor(k_base, shape=[num_keys, head_dim_qk], strides=[k_strides[2], 1],
                                          block_shape=[BLOCK_N, BLOCK_DQK])
        v_src = tl.make_tensor_descriptor(v_base, shape=[num_keys, head_dim_v], strides=[v_strides[2], 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
    else:
        q = load_rows(q_base, rows, row_ok, q_strides[2], q_strides[3], head_dim_qk, BLOCK_DQK)
        k_src = k_base
        v_src = v_base
    if NEGATIVE_SCALE:
        q = -q
    pad_ptr = PAD + b * pad_strides[0]

    # The keys of this split, then those of them the mask keeps (and whether it keeps
    # all of [lo, hi)), then causally those the group's last row reaches.
    key_start = split * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, num_keys)
    lo, hi, kept = kept_key_span(pad_ptr, key_start, key_end, pad_strides[1], HAS_MASK)
    whole_end = tl.where(kept == hi - lo, hi, lo)
    causal_offset = num_keys - num_queries
    if CAUSAL:
        hi = tl.minimum(hi, row_end + causal_offset)
        whole_end = tl.minimum(whole_end, row_start + causal_offset + 1)  # keys every row of the group sees
    whole_end = lo + tl.maximum(whole_end - lo, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WARP_SPECIALIZE:
        # Triton 3.6's Hopper warp specialization takes kernels with one loop of dots
        # and no other dot (a second loop, or one more tile after it, fails to compile;
        # a branch between whole and checked tiles inside the loop is compiled without
        # specialization), so every tile takes one path: whole tiles where the splits
        # are whole tiles (WHOLE_TILES), checked ones otherwise. No mask here (the
        # planner's rule: a padding key's V, which may hold NaN, would have to be zeroed
        # in registers, off the TMA-to-wgmma path), so lo, hi are the split's keys.
        for tile_start in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            if WHOLE_TILES:
                acc, m_i, l_i = _whole_tile(
                    acc, m_i, l_i, q, k_src, v_src, tile_start, k_strides[2], k_strides[3], v_strides[2], v_strides[3],
                    head_dim_qk, head_dim_v, qk_scale_log2, KV_DESCRIPTORS, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                    DOT_PRECISION)
            else:
                acc, m_i, l_i = _checked_tile(
                    acc, m_i, l_i, q, rows, k_src, v_src, pad_ptr, tile_start, key_end,
                    k_strides[2], k_strides[3], v_strides[2], v_strides[3], pad_strides[1], head_dim_qk, head_dim_v,
                    qk_scale_log2, causal_offset, HAS_MASK, CAUSAL, KV_DESCRIPTORS, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                DOT_PRECISION)
    else:
        for tile_start in range(lo, whole_end, BLOCK_N):
            acc, m_i, l_i = _whole_tile(
                acc, m_i, l_i, q, k_src, v_src, tile_start, k_strides[2], k_strides[3], v_strides[2], v_strides[3],
                head_dim_qk, head_dim_v, qk_scale_log2, KV_DESCRIPTORS, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION)
        for tile_start in range(whole_end, hi, BLOCK_N):
            acc, m_i, l_i = _checked_tile(
                acc, m_i, l_i, q, rows, k_src, v_src, pad_ptr, tile_start, key_end,
                k_strides[2], k_strides[3], v_strides[2], v_strides[3], pad_strides[1], head_dim_qk, head_dim_v,
                qk_scale_log2, causal_offset, HAS_MASK, CAUSAL, KV_DESCRIPTORS, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                DOT_PRECISION)

    if PARTIALS:
        part = bh * num_splits + split
        write_rows(
            acc, m_i, l_i, rows, row_ok, row_ok,
            PART_OUT + part * num_queries * head_dim_v, head_dim_v, 1,
            PART_OUT, 0, 0,
            PART_LSE + part * num_queries, 1,
            head_dim_v, 1.0, False, BLOCK_DV,
        )
    else:
        write_rows(
            acc, m_i, l_i, rows, row_ok, row_ok,
            head_start(OUT, out_strides, b, h), out_strides[2], out_strides[3],
            head_start(RES, res_strides, b, h), res_strides[2], res_strides[3],
            LSE + bh * num_queries, 1,
            head_dim_v, LN2, HAS_RESIDUAL, BLOCK_DV,
        )
