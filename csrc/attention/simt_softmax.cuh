// The online softmax step the two fp32 SIMT kernels (forward_simt.cuh,
// forward_wide_simt.cuh) share: in a key tile a lane owns one key and holds its raw
// scores against the warp's ROWS query rows; a row's running max and sum live in the
// log2 domain, the sum as per-lane shares that the warp adds in the epilogue.
#pragma once

#include <cstdint>

#include "device_utils.cuh"
#include "forward_common.cuh"

namespace pk {

// The first of a warp's rows (warp_row0, warp_row0 + 1, ...) that sees `key`: 0 when
// every row does, ROWS or more when none does (a key past key_end or a padding key).
// Only a tile crossing the diagonal needs the per-row check (crosses_diagonal).
template <int ROWS>
__device__ __forceinline__ int first_row_seeing_key(const ForwardParams& p, int key, int key0, int tile_keys,
                                                    int key_end, int block_row0, int warp_row0,
                                                    const uint8_t* padding, int64_t padding_stride) {
  const bool attended = key < key_end && (padding == nullptr || padding[key * padding_stride] == 0);
  const int first = crosses_diagonal(p, key0, tile_keys, block_row0) ? key - causal_offset(p) - warp_row0 : 0;
  return attended ? first : ROWS;
}

// Turns the lane's raw scores s[r] into its key's unnormalized weights exp2(score - max)
// and rescales the running max, the lane's share of the sum and the accumulator rows by
// the change of max. A row that has seen no key yet keeps max -inf and weights 0.
template <int ROWS, int CHANNELS>
__device__ __forceinline__ void online_softmax_tile(float (&s)[ROWS], float (&row_max)[ROWS],
                                                    float (&row_sum)[ROWS], float (&acc)[ROWS][CHANNELS],
                                                    int first_seeing_row, float scale_log2) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float score = r >= first_seeing_row ? s[r] * scale_log2 : -INFINITY;
    const float new_max = fmaxf(row_max[r], warp_max(score));
    const float base = new_max == -INFINITY ? 0.0f : new_max;
    const float correction = exp2f(row_max[r] - base);
    row_max[r] = new_max;
    s[r] = exp2f(score - base);
    row_sum[r] = row_sum[r] * correction + s[r];
#pragma unroll
    for (int c = 0; c < CHANNELS; ++c) acc[r][c] *= correction;
  }
}

}  // namespace pk
