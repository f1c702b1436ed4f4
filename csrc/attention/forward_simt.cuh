// Forward kernel for fp32 on CUDA cores: exact fp32 (no TF32), any sm_80+ GPU.
//
// A block of four warps owns 32 query rows (8 per warp) of one (batch, head) and one
// key split, and walks the split's keys in tiles of 32. For the scores a lane owns one
// key of the tile; for the output it owns the channels lane, lane + 32, ... The
// softmax is the same online (running max, running sum) softmax in the log2 domain
// as the tensor-core kernel. Causal masking (forward_common.cuh): the block walks only
// the keys its last row reaches, and checks each (row, key) only on tiles crossing the
// diagonal.
#pragma once

#include "device_utils.cuh"
#include "forward_common.cuh"
#include "forward_config.h"
#include "launch_plan.h"
#include "simt_softmax.cuh"

namespace pk {

// Copies a (ROWS, channels) block of a strided matrix element by element into a shared
// tile with SMEM_STRIDE floats per row; padding rows, rows past rows_end and channels
// past `channels` become 0.
template <int ROWS, int D, int SMEM_STRIDE>
__device__ __forceinline__ void load_tile_fp32(float* smem, const float* global, int64_t row_stride,
                                               int64_t channel_stride, int row0, int rows_end, int channels,
                                               const uint8_t* padding, int64_t padding_stride) {
  for (int i = threadIdx.x; i < ROWS * D; i += config::kSimtThreads) {
    const int r = i / D;
    const int c = i % D;
    const int row = row0 + r;
    const bool live = row < rows_end && c < channels && (padding == nullptr || padding[row * padding_stride] == 0);
    smem[r * SMEM_STRIDE + c] = live ? global[row * row_stride + c * channel_stride] : 0.0f;
  }
}

template <int DQK, int DV>
__global__ void __launch_bounds__(config::kSimtThreads) forward_simt_kernel(const ForwardParams p, const LaunchPlan plan) {
  static_assert(DV % 32 == 0, "value channels are spread over the 32 lanes");
  constexpr int kRows = config::kSimtRowsPerWarp;
  constexpr int kBlockM = config::kSimtBlockM;
  constexpr int kBlockN = config::kSimtBlockN;
  constexpr int kKStride = DQK + 1;
  constexpr int kChannelsPerLane = DV / 32;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  float* q_tile = reinterpret_cast<float*>(shared_raw);
  float* k_tile = q_tile + kBlockM * DQK;
  float* v_tile = k_tile + kBlockN * kKStride;

  const BlockWork work(p);
  const uint8_t* padding = p.key_padding == nullptr ? nullptr : p.key_padding + work.batch * p.key_padding_stride[0];
  const int64_t padding_stride = p.key_padding_stride[1];
  const float* k = work.rows<float>(p.k, p.k_stride);
  const float* v = work.rows<float>(p.v, p.v_stride);
  const RowWriter<float> writer(p, work);
  const float scale_log2 = p.scale * kLog2e;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * kBlockM;
  const int key_end = work.visible_key_end(p, m0 + kBlockM);

  load_tile_fp32<kBlockM, DQK, DQK>(q_tile, work.rows<float>(p.q, p.q_stride), p.q_stride[2], p.q_stride[3], m0,
                                    p.num_queries, p.head_dim_qk, nullptr, 0);

  float acc[kRows][kChannelsPerLane] = {};
  float row_max[kRows];
  float row_sum[kRows];  // this lane's share; the warp adds the shares in the epilogue
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }
  const float* my_queries = q_tile + warp * kRows * DQK;

  for (int key0 = work.key_begin; key0 < key_end; key0 += kBlockN) {
    __syncthreads();  // the previous tiles are consumed (and, the first time, q_tile is written)
    load_tile_fp32<kBlockN, DQK, kKStride>(k_tile, k, p.k_stride[2], p.k_stride[3], key0, key_end, p.head_dim_qk,
                                           padding, padding_stride);
    load_tile_fp32<kBlockN, DV, DV>(v_tile, v, p.v_stride[2], p.v_stride[3], key0, key_end, p.head_dim_v,
                                    padding, padding_stride);
    __syncthreads();

    float s[kRows] = {};
#pragma unroll 8
    for (int d = 0; d < DQK; ++d) {
      const float kd = k_tile[lane * kKStride + d];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = fmaf(my_queries[r * DQK + d], kd, s[r]);
    }
    const int first_seeing_row = first_row_seeing_key<kRows>(p, key0 + lane, key0, kBlockN, key_end, m0,
                                                             m0 + warp * kRows, padding, padding_stride);
    online_softmax_tile(s, row_max, row_sum, acc, first_seeing_row, scale_log2);

#pragma unroll 4
    for (int j = 0; j < kBlockN; ++j) {
      float value[kChannelsPerLane];
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) value[c] = v_tile[j * DV + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float weight = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
        for (int c = 0; c < kChannelsPerLane; ++c) acc[r][c] = fmaf(weight, value[c], acc[r][c]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float total = warp_sum(row_sum[r]);
    const int row = m0 + warp * kRows + r;
    if (row < p.num_queries) {
      const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) {
        const int channel = lane + 32 * c;
        if (channel < p.head_dim_v) writer.value(row, channel, acc[r][c] * inverse);
      }
      if (lane == 0) writer.log_sum_exp(row, row_max[r], total);
    }
  }
}

}  // namespace pk
