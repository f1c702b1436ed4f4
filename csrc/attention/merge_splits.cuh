// Merge of split-KV partials: one warp per query row.
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * out_s (+ residual)
// Splits without an attended key carry lse_s = -inf and out_s = 0, so they weigh 0;
// a row with none at all gets out = 0 (+ residual) and lse = -inf.
#pragma once

#include <cstdint>

#include "device_utils.cuh"
#include "forward.h"

namespace pk {

constexpr int kMergeWarps = 4;

template <typename T>
__device__ __forceinline__ void merge_row(const ForwardParams& p, int64_t row, int lane) {
  const int64_t bh = row / p.num_queries;
  const int m = static_cast<int>(row % p.num_queries);
  const int batch = static_cast<int>(bh / p.heads);
  const int head = static_cast<int>(bh % p.heads);
  const float* split_lse = p.partial_lse + bh * p.num_splits * p.num_queries + m;
  const float* split_out = p.partial_out + (bh * p.num_splits * p.num_queries + m) * p.head_dim_v;
  const int64_t split_lse_stride = p.num_queries;
  const int64_t split_out_stride = split_lse_stride * p.head_dim_v;

  float max_lse = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) max_lse = fmaxf(max_lse, split_lse[s * split_lse_stride]);
  max_lse = warp_max(max_lse);
  float total = 0.0f;
  if (max_lse != -INFINITY) {
    for (int s = lane; s < p.num_splits; s += 32) total += expf(split_lse[s * split_lse_stride] - max_lse);
  }
  total = warp_sum(total);
  const float lse = max_lse == -INFINITY ? -INFINITY : max_lse + logf(total);

  T* out = static_cast<T*>(p.out) + batch * p.out_stride[0] + head * p.out_stride[1] + m * p.out_stride[2];
  const T* residual = p.residual == nullptr ? nullptr
                                            : static_cast<const T*>(p.residual) + batch * p.residual_stride[0] +
                                                  head * p.residual_stride[1] + m * p.residual_stride[2];
  for (int channel = lane; channel < p.head_dim_v; channel += 32) {
    float x = 0.0f;
    if (lse != -INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        x += expf(split_lse[s * split_lse_stride] - lse) * split_out[s * split_out_stride + channel];
      }
    }
    if (residual != nullptr) x += to_float(residual[channel * p.residual_stride[3]]);
    out[channel * p.out_stride[3]] = from_float<T>(x);
  }
  if (lane == 0) p.lse[bh * p.num_queries + m] = lse;
}

template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_splits_kernel(const ForwardParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.num_queries;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kMergeWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32; row < rows; row += step) {
    merge_row<T>(p, row, threadIdx.x % 32);
  }
}

}  // namespace pk
