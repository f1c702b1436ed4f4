// Forward kernel for fp16 and bf16 on tensor cores (mma.sync m16n8k16, ldmatrix; sm_80+)
// for head dims that no compiled pair holds: Dqk and Dv up to config::kWideMaxHeadDim
// as runtime sizes rounded up to a multiple of 16 (261 runs as 272, not 512).
//
// A block of eight warps owns a 64-row query tile of one (batch, head), one key split
// and one slice of the value channels, and walks the split's keys in tiles of 64:
//   S = Q K^T over Dqk in chunks of 64 channels (accumulated in fp32 registers), the
//   online softmax, then O += P V in steps of 16 keys, and at the end O / sum
//   (+ residual) and lse.
// Warp w computes the scores of rows 16 (w % 4).. against keys 32 (w / 4).. of the tile,
// so each (row, key) is computed once; the two warps of a row group exchange their
// tile maxima (and at the end their sums) through shared memory and write their P
// into a shared tile, from which each reads the A fragments of all 64 keys. For P V,
// warp w accumulates half w / 4 of the block's slice of value channels.
//
// Where the accumulator lives: registers, 16 rows x up to 256 channels a warp (128 fp32
// a lane, the most that leaves room for the scores and addresses under the 255-register
// limit of a 256-thread block), so a block holds 64 rows x 512 channels. Shared memory
// could not hold more (64 x 1280 fp32 is 320 KiB). Dv above 512 is cut into
// cdiv(Dv, 512) equal slices taken by separate blocks, which recompute S: for Dv <= 512
// (the encoders' 261, 322, 512) nothing is recomputed.
//
// Data movement: every step's tile goes through one of two shared-memory stages with
// cp.async, the next step's copy overlapping this step's math, one barrier a step. A
// key tile takes cdiv(Dqk, 64) steps of a K chunk, then four steps of 16 keys x the
// slice's value channels. The query tile stays resident when the block then fits
// config::kWideSharedBudget (Dqk up to 432..544, as the slice leaves room); otherwise
// each step also brings the Q chunk (from L2: the query tile is small and read by every
// key tile). K/V never stay resident across query tiles as in the narrow kernel
// (DECODE): 64 keys of 2 x 1280 channels alone take 320 KiB; every block reads the
// latents' K/V from L2 instead.
//
// Causal masking (forward_common.cuh): the block's steps cover only the key tiles its
// last row reaches (none when no row reaches the split: the block then loads nothing
// and writes empty rows), and the softmax of a tile crossing the diagonal checks each
// (row, key).
//
// What the host emulation (tests/cuda_emulation/) does not check, and the reasoning
// that covers it:
//  - cp.async completes at once there. On the GPU a stage is written by the copies of
//    step t + 1 while step t reads the other stage; each thread waits for its own copies
//    (cp.async.wait_group 0) before the step's barrier, so after the barrier all of
//    the stage is in place, and the barrier also proves every warp has finished the
//    step that last read the stage about to be refilled. Zero fills and key flags are
//    plain stores ordered by the same barriers.
//  - Shared-memory ordering of plain stores (row maxima, P, row sums, key flags) is
//    given by __syncthreads alone: each is written before a barrier and read after it,
//    and not rewritten until after a further barrier (traced at each use below).
//  - Bank conflicts: rows padded by 8 elements put the eight 16-byte rows of an
//    ldmatrix in distinct banks for any row length that is a multiple of 16 elements;
//    P is stored as 32-bit pairs that fall in 32 distinct banks.
//  - Registers: the accumulator is indexed only by unrolled loop counters, so it stays
//    in registers; ptxas -v (CUDA 13.0) reports 235 registers on sm_80 and 237 on sm_90a,
//    no spills.
#pragma once

#include "device_utils.cuh"
#include "forward_common.cuh"
#include "forward_config.h"
#include "launch_plan.h"

namespace pk {

template <typename T>
__global__ void __launch_bounds__(config::kWideThreads, 1)
    forward_wide_tensor_core_kernel(const ForwardParams p, const LaunchPlan plan) {
  using Layout = config::WideTensorCoreLayout;
  constexpr int kThreads = config::kWideThreads;
  constexpr int kBlockM = config::kWideBlockM;
  constexpr int kBlockN = config::kWideBlockN;
  constexpr int kWarpKeys = config::kWideWarpKeys;
  constexpr int kChunk = config::kWideChunk;
  constexpr int kChunkStride = Layout::kChunkStride;
  constexpr int kPStride = Layout::kPStride;
  constexpr int kValueKeys = config::kWideValueKeys;
  constexpr int kValueSteps = kBlockN / kValueKeys;
  constexpr int kAccTiles = config::kWideWarpChannels / 8;  // 8-channel MMA tiles of the accumulator
  static_assert(kValueKeys == 16 && kWarpKeys % 16 == 0, "P V steps are one MMA deep");

  const Layout layout(plan.dims.qk, plan.slice_channels, plan.q_resident);
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* shared = reinterpret_cast<T*>(shared_raw);
  T* q_tile = shared;
  T* p_tile = shared + layout.p_tile();
  float* half_max = reinterpret_cast<float*>(shared_raw + layout.stats_bytes_offset());  // [half][row]
  float* half_sum = half_max + 2 * kBlockM;                                              // [half][row]
  uint8_t* key_live = shared_raw + layout.key_live_bytes_offset();

  const BlockWork work(p);
  const int slice = static_cast<int>(blockIdx.x) % plan.value_slices;
  const int m0 = static_cast<int>(blockIdx.x) / plan.value_slices * kBlockM;
  const int channel0 = slice * plan.slice_channels;  // first value channel of this block
  const int warp_channels = plan.slice_channels / 2;
  const T* q = work.rows<T>(p.q, p.q_stride);
  const T* k = work.rows<T>(p.k, p.k_stride);
  const T* v = work.rows<T>(p.v, p.v_stride) + channel0 * p.v_stride[3];
  const uint8_t* padding = p.key_padding == nullptr ? nullptr : p.key_padding + work.batch * p.key_padding_stride[0];
  const int64_t padding_stride = p.key_padding_stride[1];
  const RowWriter<T> writer(p, work);
  const float scale_log2 = p.scale * kLog2e;

  const int num_chunks = config::cdiv(plan.dims.qk, kChunk);
  const int steps_per_tile = num_chunks + kValueSteps;
  const int key_end = work.visible_key_end(p, m0 + kBlockM);
  const int num_steps = config::cdiv(key_end - work.key_begin, kBlockN) * steps_per_tile;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row_group = warp % 4;  // query rows 16 * row_group ..
  const int half = warp / 4;       // keys 32 * half .. for S; value channels half * warp_channels .. for O
  const int quad_row = lane / 4;
  const int quad_col = 2 * (lane % 4);

  // Step t of the block: K chunk t % steps_per_tile (and the Q chunk when Q streams)
  // or, after the last chunk, 16 keys of V, of key tile t / steps_per_tile.
  auto load_step = [&](int t) {
    const int step = t % steps_per_tile;
    const int key0 = work.key_begin + t / steps_per_tile * kBlockN;
    T* stage = shared + layout.stage(t & 1);
    if (step < num_chunks) {
      const int c0 = step * kChunk;
      // key_live is rewritten here for tile j + 1 during tile j's last V step: tile j's
      // flags were read in its softmax, before that step's barrier.
      load_tile<T, kBlockN, kChunk, kChunkStride, kThreads>(
          stage, k + c0 * p.k_stride[3], p.k_stride[2], p.k_stride[3], key0, key_end, p.head_dim_qk - c0,
          plan.vector_loads, padding, padding_stride, step == 0 ? key_live : nullptr);
      if (!plan.q_resident) {
        load_tile<T, kBlockM, kChunk, kChunkStride, kThreads>(stage + Layout::kChunkElements, q + c0 * p.q_stride[3],
                                                              p.q_stride[2], p.q_stride[3], m0, p.num_queries,
                                                              p.head_dim_qk - c0, plan.vector_loads, nullptr, 0);
      }
    } else {
      load_rows<T, kValueKeys, kThreads>(stage, layout.value_stride, plan.slice_channels, v, p.v_stride[2],
                                         p.v_stride[3], key0 + (step - num_chunks) * kValueKeys, key_end,
                                         p.head_dim_v - channel0, plan.vector_loads, padding, padding_stride);
    }
  };

  // Without a step (causal: no row reaches the split) nothing is loaded, so no copy
  // is left in flight when the block ends.
  if (num_steps > 0) {
    if (plan.q_resident) {
      load_rows<T, kBlockM, kThreads>(q_tile, layout.q_stride, plan.dims.qk, q, p.q_stride[2], p.q_stride[3], m0,
                                      p.num_queries, p.head_dim_qk, plan.vector_loads, nullptr, 0);
    }
    load_step(0);
    cp_async_commit();
  }

  float acc[kAccTiles][4];
#pragma unroll
  for (int n = 0; n < kAccTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  // Rows quad_row and quad_row + 8: running max (log2 domain, the same in both halves)
  // and this lane's share of the running sum over its half's keys.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  float s[kWarpKeys / 8][4];

  for (int t = 0; t < num_steps; ++t) {
    cp_async_wait_all();
    // Step t's stage is complete and visible; every warp is done with step t - 1, whose
    // stage the copies of step t + 1 now refill.
    __syncthreads();
    if (t + 1 < num_steps) load_step(t + 1);
    cp_async_commit();
    const T* stage = shared + layout.stage(t & 1);
    const int step = t % steps_per_tile;

    if (step < num_chunks) {
      // S += Q K^T over this chunk's channels; all-zero 16-channel steps past Dqk are skipped.
      if (step == 0) {
#pragma unroll
        for (int n = 0; n < kWarpKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      }
      const T* q_chunk = plan.q_resident ? q_tile + step * kChunk : stage + Layout::kChunkElements;
      const int q_stride = plan.q_resident ? layout.q_stride : kChunkStride;
      const int chunk_width = min(kChunk, plan.dims.qk - step * kChunk);
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        if (kk * 16 < chunk_width) {
          uint32_t a[4];
          ldmatrix_x4(a, q_chunk + (row_group * 16 + lane % 16) * q_stride + kk * 16 + (lane / 16) * 8);
#pragma unroll
          for (int nn = 0; nn < kWarpKeys / 16; ++nn) {
            uint32_t b[4];
            ldmatrix_x4(b, stage + (half * kWarpKeys + nn * 16 + lane % 8 + (lane / 16) * 8) * kChunkStride +
                               kk * 16 + ((lane / 8) % 2) * 8);
            mma_16x8x16<T>(s[2 * nn], a, b[0], b[1]);
            mma_16x8x16<T>(s[2 * nn + 1], a, b[2], b[3]);
          }
        }
      }

      if (step == num_chunks - 1) {
        // The tile's scores are complete: online softmax over both halves' keys.
#pragma unroll
        for (int n = 0; n < kWarpKeys / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
        }
        const int key0 = work.key_begin + t / steps_per_tile * kBlockN;
        if (padding != nullptr || key0 + kBlockN > key_end) {
#pragma unroll
          for (int n = 0; n < kWarpKeys / 8; ++n) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              if (!key_live[half * kWarpKeys + n * 8 + quad_col + c]) s[n][c] = s[n][c + 2] = -INFINITY;
            }
          }
        }
        if (crosses_diagonal(p, key0, kBlockN, m0)) {
          // Row quad_row (+ 8) of this row group sees the half's keys up to `reach` (+ 8).
          const int reach = m0 + row_group * 16 + quad_row + causal_offset(p) - (key0 + half * kWarpKeys);
#pragma unroll
          for (int n = 0; n < kWarpKeys / 8; ++n) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int key = n * 8 + quad_col + c;
              if (key > reach) s[n][c] = -INFINITY;
              if (key > reach + 8) s[n][c + 2] = -INFINITY;
            }
          }
        }
        float tile_max[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          tile_max[r] = -INFINITY;
#pragma unroll
          for (int n = 0; n < kWarpKeys / 8; ++n) tile_max[r] = fmaxf(tile_max[r], fmaxf(s[n][2 * r], s[n][2 * r + 1]));
          tile_max[r] = quad_max(tile_max[r]);
          if (lane % 4 == 0) half_max[half * kBlockM + row_group * 16 + quad_row + 8 * r] = tile_max[r];
        }
        // The other half's maxima are written. They are rewritten only in the next
        // tile's softmax, after the barriers of this tile's V steps.
        __syncthreads();
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float other = half_max[(1 - half) * kBlockM + row_group * 16 + quad_row + 8 * r];
          const float new_max = fmaxf(row_max[r], fmaxf(tile_max[r], other));
          // A row without an attended key so far keeps every exponential at exactly 0.
          const float base = new_max == -INFINITY ? 0.0f : new_max;
          const float correction = exp2f(row_max[r] - base);
          row_max[r] = new_max;
          row_sum[r] *= correction;
#pragma unroll
          for (int n = 0; n < kAccTiles; ++n) {
            if (n * 8 < warp_channels) {
              acc[n][2 * r] *= correction;
              acc[n][2 * r + 1] *= correction;
            }
          }
#pragma unroll
          for (int n = 0; n < kWarpKeys / 8; ++n) {
            s[n][2 * r] = exp2f(s[n][2 * r] - base);
            s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
            row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
          }
        }
        // P in T, read by both warps of the row group after the next step's barrier;
        // rewritten only in the next tile's softmax, after that tile's first barrier.
#pragma unroll
        for (int n = 0; n < kWarpKeys / 8; ++n) {
          T* pair = p_tile + (row_group * 16 + quad_row) * kPStride + half * kWarpKeys + n * 8 + quad_col;
          *reinterpret_cast<uint32_t*>(pair) = pack_pair<T>(s[n][0], s[n][1]);
          *reinterpret_cast<uint32_t*>(pair + 8 * kPStride) = pack_pair<T>(s[n][2], s[n][3]);
        }
      }
    } else {
      // O += P V over 16 keys: P's A fragment from the shared tile, a transposed x4
      // ldmatrix of V gives the B fragments of 16 channels.
      const int key_step = step - num_chunks;
      uint32_t a[4];
      ldmatrix_x4(a, p_tile + (row_group * 16 + lane % 16) * kPStride + key_step * kValueKeys + (lane / 16) * 8);
      const T* v_rows = stage + (lane % 8 + ((lane / 8) % 2) * 8) * layout.value_stride + half * warp_channels +
                        (lane / 16) * 8;
#pragma unroll
      for (int nn = 0; nn < kAccTiles / 2; ++nn) {
        if (nn * 16 < warp_channels) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_rows + nn * 16);
          mma_16x8x16<T>(acc[2 * nn], a, b[0], b[1]);
          mma_16x8x16<T>(acc[2 * nn + 1], a, b[2], b[3]);
        }
      }
    }
  }

  // Each half's row sums meet in shared memory; both halves add them in the same order.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float own = quad_sum(row_sum[r]);
    if (lane % 4 == 0) half_sum[half * kBlockM + row_group * 16 + quad_row + 8 * r] = own;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int tile_row = row_group * 16 + quad_row + 8 * r;
    const float total = half_sum[tile_row] + half_sum[kBlockM + tile_row];
    const int row = m0 + tile_row;
    if (row < p.num_queries) {
      const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
      for (int n = 0; n < kAccTiles; ++n) {
        const int channel = channel0 + half * warp_channels + n * 8 + quad_col;
        if (n * 8 >= warp_channels || channel >= p.head_dim_v) continue;
        if (plan.paired_stores) {
          writer.value_pair(row, channel, acc[n][2 * r] * inverse, acc[n][2 * r + 1] * inverse);
          continue;
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (channel + c < p.head_dim_v) writer.value(row, channel + c, acc[n][2 * r + c] * inverse);
        }
      }
      // Every slice has the same lse; the first writes it.
      if (slice == 0 && half == 0 && lane % 4 == 0) writer.log_sum_exp(row, row_max[r], total);
    }
  }
}

}  // namespace pk
