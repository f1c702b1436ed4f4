"""DECODE forward (Triton): persistent programs keep one head's keys resident and
stream its query tiles.

Math, for one batch b, head h and query row i over the keys j that are not padding
(and, with CAUSAL, j <= i + Nk - Nq):

    t_ij  = scale * log2(e) * <q_i, k_j>
    m_i   = max_j t_ij
    p_ij  = 2^(t_ij - m_i),   l_i = sum_j p_ij
    out_i = (sum_j p_ij v_j) / l_i  (+ residual_i)
    lse_i = (m_i + log2 l_i) * ln 2

All keys of a head fit one block (BLOCK_N >= Nk), so this is the exact softmax in a
single pass: one max, one exp2 per score, one sum, one P V product and one division
per row, with no running rescale. A row that sees no key (m = -inf) takes the
exponents against 0, so p = 0, l = 0, and it gets out = 0 (+ residual) and
lse = -inf without a NaN.

Work: the (batch*head, query tile) pairs are numbered head by head, and each of the
persistent programs (a multiple of the SMs, or one per tile when there are fewer
tiles) takes one contiguous range of them, so it meets at most two heads unless a
head has fewer tiles than a program. For each head of its range it loads K^T and V
once, as loop-invariant dot operands (on Hopper, wgmma reads them from shared memory
where they are stored once per head), and walks that head's tiles of the range:
load Q (TMA through a host tensor descriptor, or pointers), the dots, the softmax,
write O (descriptor or pointers) and lse. The tile loop is software-pipelined
(the launch's num_stages query tiles in flight).

Key padding: the kept keys of a head are gathered into the first slots
(kept_key_slots), so padding keys, whatever they hold (NaN), are never loaded, and a
score is masked by one comparison of its slot with the kept count (the same that
masks the slots past Nk) instead of a per-column mask held in registers. CAUSAL
compares each slot's key index with the row's reach.
"""

import triton
import triton.language as tl

from .common import LN2, head_start, load_rows, store_rows, usable_keys

# Mask bytes kept_key_slots ranks at a time: a (KEY_RANK_CHUNK x BLOCK_N) comparison
# stays small in registers.
KEY_RANK_CHUNK = tl.constexpr(32)


@triton.jit
def kept_key_slots(pad_ptr, stride_pad_n, num_keys, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """The key held by each of the BLOCK_N slots, and the number of kept keys: the keys
    that are not padding fill the first slots, in order (without a mask, slot s holds
    key s); slots from the kept count on hold none.

    With c_i the number of kept keys among 0..i, the key of slot s is the number of keys
    with c_i <= s (the kept key of rank s + 1 is the first whose count passes s).
    """
    slots = tl.arange(0, BLOCK_N)
    if not HAS_MASK:
        return slots, num_keys
    key_of_slot = tl.zeros([BLOCK_N], dtype=tl.int32)
    kept = tl.zeros([], dtype=tl.int32)
    for chunk_start in range(0, num_keys, KEY_RANK_CHUNK):
        keys = chunk_start + tl.arange(0, KEY_RANK_CHUNK)
        is_kept = usable_keys(pad_ptr, keys, num_keys, stride_pad_n, True).to(tl.int32)
        count = kept + tl.cumsum(is_kept, 0)
        key_of_slot += tl.sum((count[:, None] <= slots[None, :]).to(tl.int32), 0)
        kept += tl.sum(is_kept, 0)
    return key_of_slot, kept


@triton.jit
def decode_fwd_kernel(
    Q, K, V, PAD, RES, OUT, LSE,
    q_strides, k_strides, v_strides, pad_strides, res_strides, out_strides,
    batch_heads, heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_SLOTS: tl.constexpr, DESCRIPTORS: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Persistent DECODE forward of 16-bit inputs; writes out and lse (B, H, Nq).

    DESCRIPTORS: Q, RES and OUT are host tensor descriptors of their (B, H, Nq, D)
    views with blocks (1, 1, BLOCK_M, BLOCK_D) (TMA on Hopper: rows past Nq and
    channels past D load as 0 and are not stored), and their strides here are unused;
    otherwise pointers, every access masked. MASK_SLOTS: some of the BLOCK_N slots hold
    no key (fewer keys, or a padding mask), so their scores are masked.
    """
    # Tile and head indices are 32-bit (the launcher keeps the tile count below 2^31),
    # so no 64-bit division runs; pointer offsets are 64-bit.
    tiles_per_head = tl.cdiv(num_queries, BLOCK_M)
    programs = tl.num_programs(0)
    pid = tl.program_id(0)
    total_tiles = batch_heads * tiles_per_head
    first = pid * (total_tiles // programs) + tl.minimum(pid, total_tiles % programs)
    end = first + total_tiles // programs + (pid < total_tiles % programs).to(tl.int32)

    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    causal_offset = num_keys - num_queries
    for bh in range(first // tiles_per_head, (end - 1) // tiles_per_head + 1):
        b32 = bh // heads
        h32 = bh % heads
        b = b32.to(tl.int64)
        h = h32.to(tl.int64)
        key_of_slot, kept = kept_key_slots(PAD + b * pad_strides[0], pad_strides[1], num_keys, BLOCK_N, HAS_MASK)
        slot_ok = tl.arange(0, BLOCK_N) < kept
        # Loop-invariant dot operands of the tile loop. Slots without a key read 0, so
        # NaN in padding keys never reaches a product. Key offsets in 64 bits (a key stride
        # may exceed 2^31 / BLOCK_N elements: K stored keys-outermost).
        key_offsets = key_of_slot.to(tl.int64)
        k_t = tl.load(head_start(K, k_strides, b, h) + key_offsets[None, :] * k_strides[2]
                      + offs_dqk[:, None] * k_strides[3],
                      mask=slot_ok[None, :] & (offs_dqk < head_dim_qk)[:, None], other=0.0)
        v = tl.load(head_start(V, v_strides, b, h) + key_offsets[:, None] * v_strides[2]
                    + offs_dv[None, :] * v_strides[3],
                    mask=slot_ok[:, None] & (offs_dv < head_dim_v)[None, :], other=0.0)

        head_first_tile = bh * tiles_per_head
        tile_start = tl.maximum(first, head_first_tile) - head_first_tile
        tile_end = tl.minimum(end, head_first_tile + tiles_per_head) - head_first_tile
        # disable_licm: hoisting the per-score index and mask arithmetic out of the loop
        # would hold it in registers across tiles, which the score tile needs (sm_90,
        # 256 keys, head dim 64: with mask and residual it spilled 256 bytes in triton
        # 3.9 and 8 in 3.6, without them 24 in 3.6; kept in the loop, none spills).
        for tile in tl.range(tile_start, tile_end, disable_licm=True):
            row_start = tile * BLOCK_M
            rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < num_queries
            if DESCRIPTORS:
                q = Q.load([b32, h32, row_start, 0]).reshape(BLOCK_M, BLOCK_DQK)
            else:
                q = load_rows(head_start(Q, q_strides, b, h), rows, row_ok, q_strides[2], q_strides[3], head_dim_qk,
                              BLOCK_DQK)

            t = tl.dot(q, k_t) * qk_scale_log2
            if MASK_SLOTS:
                # Compared here, not hoisted with slot_ok: a mask held across tiles
                # would take registers the score tile needs.
                t = tl.where(tl.arange(0, BLOCK_N)[None, :] < kept, t, float("-inf"))
            if CAUSAL:
                t = tl.where(key_of_slot[None, :] <= rows[:, None] + causal_offset, t, float("-inf"))
            m_i = tl.max(t, 1)
            m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.math.exp2(t - m_ref[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v)

            has_keys = l_i > 0.0
            out = acc * (1.0 / tl.where(has_keys, l_i, 1.0))[:, None]
            if HAS_RESIDUAL:
                if DESCRIPTORS:
                    res = RES.load([b32, h32, row_start, 0]).reshape(BLOCK_M, BLOCK_DV)
                else:
                    res = load_rows(head_start(RES, res_strides, b, h), rows, row_ok, res_strides[2], res_strides[3],
                                    head_dim_v, BLOCK_DV)
                out += res.to(tl.float32)
            if DESCRIPTORS:
                OUT.store([b32, h32, row_start, 0], out.to(OUT.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))
            else:
                store_rows(head_start(OUT, out_strides, b, h), out, rows, row_ok, out_strides[2], out_strides[3],
                           head_dim_v, BLOCK_DV)
            lse = tl.where(has_keys, (m_ref + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
            tl.store(LSE + (b * heads + h) * num_queries + rows, lse, mask=row_ok)
