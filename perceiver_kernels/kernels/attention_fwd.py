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

Rows whose keys are all padding keep m = -inf and l = 0: exponents are taken
against a stand-in max of 0 so no NaN appears, and the epilogue writes out = 0
(+ residual) and lse = -inf. Offsets are int64 (B*H*Nk*D can exceed 2^31); every
load and store is masked, so any Nq, Nk and head dim (padded to a power of two
inside) work, with any strides.
"""

import triton
import triton.language as tl

from .common import AUTOTUNE, AUTOTUNE_TIMER, INTERPRETED, LN2, load_rows, program_coordinates, usable_keys


def _keep_fitting_configs(configs, named_args, **kwargs):
    """Drops configs that waste work or cannot fit for this shape class.

    - A key block larger than the keys a program sees only multiplies padding.
    - Head dims above 128 double the register/shared-memory cost of every tile:
      keep tiles of at most 64x64 and at most 2 pipeline stages there.
    - Exact fp32 (DOT_PRECISION "ieee") multiplies on CUDA cores with both operands
      in registers: tiles above 64x32 or fewer than 8 warps spill (ptxas for sm_80
      and sm_90, tests/triton_compile.py).
    Without autotuning the first config that is kept runs.
    """
    args = {**named_args, **kwargs}
    keys_per_program = max(16, triton.next_power_of_2(max(1, args["tuning_keys_per_program"])))
    wide_head = max(args["BLOCK_DQK"], args["BLOCK_DV"]) > 128
    exact_fp32 = args["DOT_PRECISION"] == "ieee"
    kept = []
    for config in configs:
        block_n = config.kwargs["BLOCK_N"]
        block_m = config.kwargs.get("BLOCK_M", args.get("BLOCK_M"))
        if block_n > keys_per_program:
            continue
        if wide_head and (block_n > 64 or block_m > 64 or config.num_stages > 2):
            continue
        if exact_fp32 and (block_n > 32 or block_m > 64 or config.num_warps < 8):
            continue
        kept.append(config)
    # Tiny shapes prune everything above 16 keys: fall back to the smallest tile.
    kept = kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs.get("BLOCK_M", 0), c.num_stages))]
    return kept if AUTOTUNE else kept[:1]


def _configs(block_ms, block_ns, warps, stages):
    return [
        triton.Config({**({"BLOCK_M": m} if m else {}), "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_ms
        for n in block_ns
        for w in warps
        for s in stages
    ]


if AUTOTUNE:
    _TILE_CONFIGS = _configs((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    _SPLIT_CONFIGS = _configs((None,), (32, 64, 128), (4, 8), (2, 3, 4))
else:  # one config for 16-bit inputs, then one for exact fp32 (the pruning picks)
    _TILE_CONFIGS = (_configs((32 if INTERPRETED else 64,), (64,), (4,), (2,))
                     + _configs((32 if INTERPRETED else 64,), (32,), (8,), (2,)))
    _SPLIT_CONFIGS = _configs((None,), (64,), (4,), (2,)) + _configs((None,), (32,), (8,), (2,))

_TUNING_KEY = ["BLOCK_DQK", "BLOCK_DV", "tuning_keys_per_program", "HAS_MASK", "HAS_RESIDUAL", "DOT_PRECISION"]


@triton.jit
def _accumulate_keys(
    acc, m_i, l_i, q,
    k_ptr, v_ptr, pad_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    key_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Folds keys [key_start, key_end) of one (batch, head) into the running softmax state."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dqk_ok = offs_dqk < head_dim_qk
    dv_ok = offs_dv < head_dim_v
    for block_start in range(key_start, key_end, BLOCK_N):
        keys = (block_start + offs_n).to(tl.int64)
        key_ok = usable_keys(pad_ptr, keys, key_end, stride_pad_n, HAS_MASK)
        # Padding keys are never loaded: whatever they hold (even NaN) cannot leak in.
        k_t = tl.load(k_ptr + keys[None, :] * stride_kn + offs_dqk[:, None] * stride_kd,
                      mask=key_ok[None, :] & dqk_ok[:, None], other=0.0)
        t = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2
        t = tl.where(key_ok[None, :], t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(t - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + keys[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _write_rows(
    acc, m_i, l_i, rows, row_ok,
    out_ptr, stride_om, stride_od,
    res_ptr, stride_rm, stride_rd,
    lse_ptr, stride_lm,
    head_dim_v, LSE_UNIT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Normalises acc, adds the residual, stores out and lse = (m + log2 l) * LSE_UNIT.

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
    tl.store(lse_ptr + rows * stride_lm, lse, mask=row_ok)


@triton.autotune(configs=_TILE_CONFIGS, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _keep_fitting_configs},
                 do_bench=AUTOTUNE_TIMER)
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
    tuning_keys_per_program,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
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
        acc, m_i, l_i, q,
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, PAD + b * stride_pb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        0, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
        HAS_MASK, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION,
    )
    _write_rows(
        acc, m_i, l_i, rows, row_ok,
        OUT + b * stride_ob + h * stride_oh, stride_om, stride_od,
        RES + b * stride_rb + h * stride_rh, stride_rm, stride_rd,
        LSE + bh * num_queries, 1,
        head_dim_v, LN2, HAS_RESIDUAL, BLOCK_DV,
    )


@triton.autotune(configs=_SPLIT_CONFIGS, key=_TUNING_KEY + ["BLOCK_M"],
                 prune_configs_by={"early_config_prune": _keep_fitting_configs}, do_bench=AUTOTUNE_TIMER)
@triton.jit
def attention_fwd_split_kernel(
    Q, K, V, PAD, PART_OUT, PART_LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    heads, num_queries, num_keys, head_dim_qk, head_dim_v, qk_scale_log2,
    num_splits, keys_per_split,
    tuning_keys_per_program,
    HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
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
        acc, m_i, l_i, q,
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, PAD + b * stride_pb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        key_start, key_end, head_dim_qk, head_dim_v, qk_scale_log2,
        HAS_MASK, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PRECISION,
    )
    part = bh * num_splits + chunk
    _write_rows(
        acc, m_i, l_i, rows, row_ok,
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
):
    """Combines the S partials of each row: out = sum_s 2^(lse_s - LSE) o_s, + residual."""
    tile, _, bh, b, h = program_coordinates(tl.cdiv(num_queries, BLOCK_M), 1, heads)

    rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_queries
    offs_dv = tl.arange(0, BLOCK_DV)
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
    _write_rows(
        acc, m_i, l_i, rows, row_ok,
        OUT + b * stride_ob + h * stride_oh, stride_om, stride_od,
        RES + b * stride_rb + h * stride_rh, stride_rm, stride_rd,
        LSE + bh * num_queries, 1,
        head_dim_v, LN2, HAS_RESIDUAL, BLOCK_DV,
    )
