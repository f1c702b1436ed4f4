// Forward kernel for fp16 and bf16 on tensor cores (mma.sync m16n8k16, ldmatrix; sm_80+).
//
// A block of four warps owns a tile of 64 query rows (16 per warp) of one
// (batch, head) and one key split, and walks that split's keys in tiles of 64:
//   S = Q K^T (fp32, log2 domain), online softmax (running max and sum per row),
//   O += P V with P rounded to T, and at the end O / sum (+ residual) and lse.
// K/V tiles either stream through two shared-memory buffers (cp.async prefetch of
// the next tile while the current one is multiplied) or, when a block runs several
// query tiles over few keys (DECODE), are loaded once and stay resident.
// Causal masking (forward_common.cuh): a block loads no key past its last query row's
// reach, each query tile walks only the key tiles its own rows reach (with resident
// K/V, a prefix of those loaded), and only tiles crossing the diagonal check each
// (row, key).
#pragma once

#include "device_utils.cuh"
#include "forward_common.cuh"
#include "forward_config.h"
#include "launch_plan.h"

namespace pk {

template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(config::kTensorCoreThreads)
    forward_tensor_core_kernel(const ForwardParams p, const LaunchPlan plan) {
  static_assert(DQK % 16 == 0 && DV % 16 == 0, "head dims of the MMA kernel are multiples of 16");
  constexpr int kThreads = config::kTensorCoreThreads;
  constexpr int kBlockM = config::kTensorCoreBlockM;
  constexpr int kBlockN = config::kTensorCoreBlockN;
  constexpr int kQkStride = DQK + config::kSharedRowPad;
  constexpr int kVStride = DV + config::kSharedRowPad;
  constexpr int kKElements = kBlockN * kQkStride;
  constexpr int kKvElements = kKElements + kBlockN * kVStride;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* q_tile = reinterpret_cast<T*>(shared_raw);
  T* kv_tiles = q_tile + kBlockM * kQkStride;
  uint8_t* key_live = shared_raw + config::tensor_core_tile_bytes(HeadDims{DQK, DV}, plan.kv_slots);

  const BlockWork work(p);
  const T* q = work.rows<T>(p.q, p.q_stride);
  const T* k = work.rows<T>(p.k, p.k_stride);
  const T* v = work.rows<T>(p.v, p.v_stride);
  const uint8_t* padding = p.key_padding == nullptr ? nullptr : p.key_padding + work.batch * p.key_padding_stride[0];
  const int64_t padding_stride = p.key_padding_stride[1];
  const RowWriter<T> writer(p, work);
  const float scale_log2 = p.scale * kLog2e;

  const int first_tile = blockIdx.x * plan.query_tiles_per_block;
  const int end_tile = min(config::cdiv(p.num_queries, kBlockM), first_tile + plan.query_tiles_per_block);
  // The keys this block loads: the split's, or with causal masking those its last query
  // tile reaches (the other tiles of a resident block reach a prefix of them).
  const int key_end = work.visible_key_end(p, end_tile * kBlockM);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad_row = lane / 4;       // row of the MMA fragments this lane holds (and +8)
  const int quad_col = 2 * (lane % 4);  // first of the two columns it holds in each 8-wide tile

  auto load_kv = [&](int slot, int key_tile) {
    T* k_dst = kv_tiles + slot * kKvElements;
    const int key0 = work.key_begin + key_tile * kBlockN;
    load_tile<T, kBlockN, DQK, kQkStride, kThreads>(k_dst, k, p.k_stride[2], p.k_stride[3], key0, key_end,
                                                    p.head_dim_qk, plan.vector_loads, padding, padding_stride,
                                                    key_live + slot * kBlockN);
    load_tile<T, kBlockN, DV, kVStride, kThreads>(k_dst + kKElements, v, p.v_stride[2], p.v_stride[3], key0,
                                                  key_end, p.head_dim_v, plan.vector_loads, padding,
                                                  padding_stride);
  };

  if (plan.kv_resident) {
    // Every key tile the block reaches gets its own slot. The copies are committed and
    // waited for (cp.async.wait_group 0, then a barrier) with the first query tile's,
    // even when that tile reaches fewer key tiles than a later one (causal): on the
    // GPU no copy is still in flight when any tile reads a slot. The emulation
    // completes copies at once and cannot show that order; the wait covers it.
    const int loaded_tiles = config::cdiv(key_end - work.key_begin, kBlockN);
    for (int j = 0; j < loaded_tiles; ++j) load_kv(j, j);
  }

  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int m0 = tile * kBlockM;
    // Block-uniform, so every thread meets the same barriers below.
    const int num_key_tiles = config::cdiv(work.visible_key_end(p, m0 + kBlockM) - work.key_begin, kBlockN);
    load_tile<T, kBlockM, DQK, kQkStride, kThreads>(q_tile, q, p.q_stride[2], p.q_stride[3], m0, p.num_queries,
                                                    p.head_dim_qk, plan.vector_loads, nullptr, 0);
    if (!plan.kv_resident && num_key_tiles > 0) load_kv(0, 0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // This warp's 16 query rows as A fragments, one per 16 channels.
    uint32_t q_frag[DQK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DQK / 16; ++kk) {
      ldmatrix_x4(q_frag[kk], q_tile + (warp * 16 + lane % 16) * kQkStride + kk * 16 + (lane / 16) * 8);
    }

    float acc[DV / 8][4];
#pragma unroll
    for (int n = 0; n < DV / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    // Rows quad_row and quad_row + 8: running max (log2 domain) and this lane's share
    // of the running sum (the quad adds its shares in the epilogue).
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};

    for (int j = 0; j < num_key_tiles; ++j) {
      const bool prefetch = !plan.kv_resident && j + 1 < num_key_tiles;
      if (prefetch) {
        // The other buffer was last read in iteration j - 1, which ended with a barrier.
        load_kv((j + 1) & 1, j + 1);
        cp_async_commit();
      }
      const int slot = plan.kv_resident ? j : (j & 1);
      const T* k_tile = kv_tiles + slot * kKvElements;
      const T* v_tile = k_tile + kKElements;

      // S = Q K^T: an x4 ldmatrix of K gives the B fragments of two 8-key tiles.
      float s[kBlockN / 8][4];
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk) {
#pragma unroll
        for (int nn = 0; nn < kBlockN / 16; ++nn) {
          uint32_t kb[4];
          ldmatrix_x4(kb, k_tile + (nn * 16 + lane % 8 + (lane / 16) * 8) * kQkStride + kk * 16 + ((lane / 8) % 2) * 8);
          mma_16x8x16<T>(s[2 * nn], q_frag[kk], kb[0], kb[1]);
          mma_16x8x16<T>(s[2 * nn + 1], q_frag[kk], kb[2], kb[3]);
        }
      }

#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
      }
      const int key0 = work.key_begin + j * kBlockN;
      if (padding != nullptr || key0 + kBlockN > key_end) {
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (!key_live[slot * kBlockN + n * 8 + quad_col + c]) s[n][c] = s[n][c + 2] = -INFINITY;
          }
        }
      }
      if (crosses_diagonal(p, key0, kBlockN, m0)) {
        // Row quad_row (+ 8) of this warp sees the tile's keys up to `reach` (+ 8).
        const int reach = m0 + warp * 16 + quad_row + causal_offset(p) - key0;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int key = n * 8 + quad_col + c;
            if (key > reach) s[n][c] = -INFINITY;
            if (key > reach + 8) s[n][c + 2] = -INFINITY;
          }
        }
      }

      // Online softmax: rescale what was accumulated to the new running max.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        const float new_max = fmaxf(row_max[r], quad_max(tile_max));
        // A row without an attended key so far keeps every exponential at exactly 0.
        const float base = new_max == -INFINITY ? 0.0f : new_max;
        const float correction = exp2f(row_max[r] - base);
        row_max[r] = new_max;
        row_sum[r] *= correction;
#pragma unroll
        for (int n = 0; n < DV / 8; ++n) {
          acc[n][2 * r] *= correction;
          acc[n][2 * r + 1] *= correction;
        }
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
          s[n][2 * r] = exp2f(s[n][2 * r] - base);
          s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
          row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
        }
      }

      // O += P V: the score fragments of two adjacent 8-key tiles form the A fragment
      // of 16 keys; a transposed x4 ldmatrix of V gives the B fragments of 16 channels.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint32_t p_frag[4] = {
            pack_pair<T>(s[2 * kk][0], s[2 * kk][1]), pack_pair<T>(s[2 * kk][2], s[2 * kk][3]),
            pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int nn = 0; nn < DV / 16; ++nn) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kVStride + nn * 16 + (lane / 16) * 8);
          mma_16x8x16<T>(acc[2 * nn], p_frag, vb[0], vb[1]);
          mma_16x8x16<T>(acc[2 * nn + 1], p_frag, vb[2], vb[3]);
        }
      }

      if (prefetch) cp_async_wait_all();
      __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = quad_sum(row_sum[r]);
      const int row = m0 + warp * 16 + quad_row + 8 * r;
      if (row < p.num_queries) {
        const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
        for (int n = 0; n < DV / 8; ++n) {
          const int channel = n * 8 + quad_col;
          if (plan.paired_stores) {
            if (channel < p.head_dim_v) {
              writer.value_pair(row, channel, acc[n][2 * r] * inverse, acc[n][2 * r + 1] * inverse);
            }
            continue;
          }
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (channel + c < p.head_dim_v) writer.value(row, channel + c, acc[n][2 * r + c] * inverse);
          }
        }
        if (lane % 4 == 0) writer.log_sum_exp(row, row_max[r], total);
      }
    }
    // The next query tile overwrites q_tile.
    __syncthreads();
  }
}

}  // namespace pk
