// Forward kernel for fp32 on CUDA cores (exact fp32, no TF32) for head dims that no
// compiled pair holds: Dqk and Dv up to config::kWideMaxHeadDim as runtime sizes.
//
// The narrow SIMT kernel's work split (forward_simt.cuh): four warps own 32 query rows
// (8 a warp) and walk the split's keys in tiles of 32, a lane owning one key of the
// tile for the scores and the channels lane, lane + 32, ... for the output. Here the
// scores accumulate over Dqk in chunks of config::kWideChunk channels, the Q and K
// chunks streaming through shared memory, and a block accumulates one slice of at most
// 32 x LANE_CHANNELS value channels in registers (8 rows x LANE_CHANNELS a lane); wider
// Dv is cut into equal slices taken by separate blocks, which recompute the scores.
// Causal masking as in the narrow kernel (forward_common.cuh).
// Loads are plain (no cp.async), so the host emulation's immediate copies are exact;
// it does not model the memory model, which the barriers below order.
#pragma once

#include "device_utils.cuh"
#include "forward_common.cuh"
#include "forward_config.h"
#include "launch_plan.h"
#include "simt_softmax.cuh"

namespace pk {

// Copies rows [row0, row0 + ROWS) x channels [0, width) of a strided matrix element by
// element into a shared tile of smem_stride floats per row; padding rows, rows past
// rows_end and channels past `channels` become 0.
template <int ROWS>
__device__ __forceinline__ void load_rows_fp32(float* smem, int smem_stride, int width, const float* global,
                                               int64_t row_stride, int64_t channel_stride, int row0, int rows_end,
                                               int channels, const uint8_t* padding, int64_t padding_stride) {
  for (int i = threadIdx.x; i < ROWS * width; i += config::kSimtThreads) {
    const int r = i / width;
    const int c = i % width;
    const int row = row0 + r;
    const bool live = row < rows_end && c < channels && (padding == nullptr || padding[row * padding_stride] == 0);
    smem[r * smem_stride + c] = live ? global[row * row_stride + c * channel_stride] : 0.0f;
  }
}

template <int LANE_CHANNELS>
__global__ void __launch_bounds__(config::kSimtThreads)
    forward_wide_simt_kernel(const ForwardParams p, const LaunchPlan plan) {
  constexpr int kRows = config::kSimtRowsPerWarp;
  constexpr int kBlockM = config::kSimtBlockM;
  constexpr int kBlockN = config::kSimtBlockN;
  constexpr int kChunk = config::kWideChunk;
  constexpr int kKStride = kChunk + 1;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  float* q_chunk = reinterpret_cast<float*>(shared_raw);
  float* k_chunk = q_chunk + kBlockM * kChunk;
  float* v_tile = k_chunk + kBlockN * kKStride;

  const BlockWork work(p);
  const int slice = static_cast<int>(blockIdx.x) % plan.value_slices;
  const int m0 = static_cast<int>(blockIdx.x) / plan.value_slices * kBlockM;
  const int channel0 = slice * plan.slice_channels;
  const int slice_channels = plan.slice_channels;
  const int key_end = work.visible_key_end(p, m0 + kBlockM);
  const uint8_t* padding = p.key_padding == nullptr ? nullptr : p.key_padding + work.batch * p.key_padding_stride[0];
  const int64_t padding_stride = p.key_padding_stride[1];
  const float* q = work.rows<float>(p.q, p.q_stride);
  const float* k = work.rows<float>(p.k, p.k_stride);
  const float* v = work.rows<float>(p.v, p.v_stride) + channel0 * p.v_stride[3];
  const RowWriter<float> writer(p, work);
  const float scale_log2 = p.scale * kLog2e;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  float acc[kRows][LANE_CHANNELS] = {};
  float row_max[kRows];
  float row_sum[kRows];  // this lane's share; the warp adds the shares in the epilogue
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }
  const float* my_queries = q_chunk + warp * kRows * kChunk;

  for (int key0 = work.key_begin; key0 < key_end; key0 += kBlockN) {
    float s[kRows] = {};
    for (int c0 = 0; c0 < p.head_dim_qk; c0 += kChunk) {
      __syncthreads();  // the previous chunks (and the previous tile's V) are consumed
      load_rows_fp32<kBlockM>(q_chunk, kChunk, kChunk, q + c0 * p.q_stride[3], p.q_stride[2], p.q_stride[3], m0,
                              p.num_queries, p.head_dim_qk - c0, nullptr, 0);
      load_rows_fp32<kBlockN>(k_chunk, kKStride, kChunk, k + c0 * p.k_stride[3], p.k_stride[2], p.k_stride[3], key0,
                              key_end, p.head_dim_qk - c0, padding, padding_stride);
      __syncthreads();
      const int width = min(kChunk, p.head_dim_qk - c0);
#pragma unroll 8
      for (int d = 0; d < width; ++d) {
        const float kd = k_chunk[lane * kKStride + d];
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[r] = fmaf(my_queries[r * kChunk + d], kd, s[r]);
      }
    }
    const int first_seeing_row = first_row_seeing_key<kRows>(p, key0 + lane, key0, kBlockN, key_end, m0,
                                                             m0 + warp * kRows, padding, padding_stride);
    online_softmax_tile(s, row_max, row_sum, acc, first_seeing_row, scale_log2);

    // v_tile was last read in the previous tile, before this tile's first chunk barrier.
    load_rows_fp32<kBlockN>(v_tile, slice_channels, slice_channels, v, p.v_stride[2], p.v_stride[3], key0,
                            key_end, p.head_dim_v - channel0, padding, padding_stride);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kBlockN; ++j) {
      float value[LANE_CHANNELS];
#pragma unroll
      for (int c = 0; c < LANE_CHANNELS; ++c) {
        if (32 * c < slice_channels) value[c] = v_tile[j * slice_channels + lane + 32 * c];
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float weight = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
        for (int c = 0; c < LANE_CHANNELS; ++c) {
          if (32 * c < slice_channels) acc[r][c] = fmaf(weight, value[c], acc[r][c]);
        }
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
      for (int c = 0; c < LANE_CHANNELS; ++c) {
        const int channel = channel0 + lane + 32 * c;
        if (32 * c < slice_channels && channel < p.head_dim_v) writer.value(row, channel, acc[r][c] * inverse);
      }
      // Every slice has the same lse; the first writes it.
      if (slice == 0 && lane == 0) writer.log_sum_exp(row, row_max[r], total);
    }
  }
}

}  // namespace pk
