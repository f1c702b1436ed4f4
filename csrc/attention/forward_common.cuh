// Pieces the forward kernels share: where a block works (and which keys causal masking
// leaves it), tile loading with zero fill, and the epilogue that writes a finished row
// (final output or split partial).
//
// Causal masking (ForwardParams::causal): row i sees key j iff j <= i + causal_offset,
// causal_offset = Nk - Nq. A block never visits keys past the reach of its last query
// row (BlockWork::visible_key_end: a split entirely past it runs no key tile and writes
// an empty partial, lse = -inf, which the merge weighs 0); of the tiles it visits, only
// those crossing the diagonal (crosses_diagonal) check each (row, key), the others run
// exactly as without causal masking.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "forward.h"

namespace pk {

constexpr float kLn2 = 0.69314718055994531f;
constexpr float kLog2e = 1.44269504088896341f;

// Row i sees keys j <= i + causal_offset under causal masking. Taken as one difference:
// a tile row plus it stays below Nk + 64 (tile rows run at most 63 past Nq), exact in
// int32, where row + Nk - Nq evaluated left to right could overflow.
__device__ __forceinline__ int causal_offset(const ForwardParams& p) { return p.num_keys - p.num_queries; }

// The (batch, head) and the key range of this block's split.
struct BlockWork {
  int batch, head, split;
  int key_begin, key_end;

  __device__ explicit BlockWork(const ForwardParams& p)
      : batch(blockIdx.z / p.heads),
        head(blockIdx.z % p.heads),
        split(static_cast<int>(blockIdx.y)),
        key_begin(split_boundary(p, split)),
        key_end(split_boundary(p, split + 1)) {}

  // First key of split `s` (num_keys past the last split), in 64 bits: the product
  // may exceed int32 when splits are long.
  __device__ static int split_boundary(const ForwardParams& p, int s) {
    const int64_t key = static_cast<int64_t>(s) * p.keys_per_split;
    return key < p.num_keys ? static_cast<int>(key) : p.num_keys;
  }

  template <typename T>
  __device__ const T* rows(const void* base, const int64_t (&stride)[4]) const {
    return static_cast<const T*>(base) + batch * stride[0] + head * stride[1];
  }

  // The end of the split's keys that query rows below `rows_end` may see: key_end, or
  // with causal masking no further than the last row's reach and never below
  // key_begin (an empty range when no row reaches the split). Exact in int32: the
  // reach is at most Nk.
  __device__ int visible_key_end(const ForwardParams& p, int rows_end) const {
    if (!p.causal) return key_end;
    const int reach = min(rows_end, p.num_queries) + causal_offset(p);
    return max(key_begin, min(key_end, reach));
  }
};

// Whether keys [key0, key0 + keys) hold one that query row first_row does not see under
// causal masking: then each (row, key) of the tile must be checked, else none needs it
// (later rows see more).
__device__ __forceinline__ bool crosses_diagonal(const ForwardParams& p, int key0, int keys, int first_row) {
  return p.causal && key0 + keys - 1 > first_row + causal_offset(p);
}

// One 16-byte chunk, channels [c, c + 16 / sizeof(T)), of a tile row: zero when the row
// is not live or the channels lie past `channels`; copied asynchronously (cp.async)
// when vector_loads and the chunk is whole; else element by element with any stride.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* global_row, int c, int channels,
                                           int64_t channel_stride, bool live, bool vector_loads) {
  constexpr int kChunk = 16 / sizeof(T);
  if (!live || c >= channels) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  } else if (vector_loads && c + kChunk <= channels) {
    cp_async_16(dst, global_row + c);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      dst[e] = c + e < channels ? global_row[(c + e) * channel_stride] : from_float<T>(0.0f);
    }
  }
}

// Copies rows [row0, row0 + ROWS) x channels [0, D) of a (row, channel) matrix in global
// memory into a shared tile with SMEM_STRIDE elements per row. Rows at or past
// rows_end, rows marked as padding, and channels at or past `channels` become 0, so
// the padded parts of a tile add nothing (a padding key may even hold NaN). With
// vector_loads every full 16-byte chunk is copied asynchronously (cp.async); the
// caller commits and waits. When row_live is given, row_live[r] records whether row r
// is live (in range and not padding), for the score mask.
template <typename T, int ROWS, int D, int SMEM_STRIDE, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* global, int64_t row_stride, int64_t channel_stride,
                                          int row0, int rows_end, int channels, bool vector_loads,
                                          const uint8_t* padding, int64_t padding_stride,
                                          uint8_t* row_live = nullptr) {
  constexpr int kChunk = 16 / sizeof(T);
  static_assert(D % kChunk == 0 && SMEM_STRIDE % kChunk == 0, "tile rows must hold whole 16-byte chunks");
  constexpr int kChunksPerRow = D / kChunk;
#pragma unroll 2
  for (int i = threadIdx.x; i < ROWS * kChunksPerRow; i += THREADS) {
    const int r = i / kChunksPerRow;
    const int c = (i % kChunksPerRow) * kChunk;
    const int row = row0 + r;
    const bool live = row < rows_end && (padding == nullptr || padding[row * padding_stride] == 0);
    if (row_live != nullptr && c == 0) row_live[r] = live;
    load_chunk(smem + r * SMEM_STRIDE + c, global + row * row_stride, c, channels, channel_stride, live,
               vector_loads);
  }
}

// load_tile for a width known only at run time: `width` channels (a multiple of 16
// bytes) of ROWS rows into a tile of smem_stride elements per row.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(T* smem, int smem_stride, int width, const T* global, int64_t row_stride,
                                          int64_t channel_stride, int row0, int rows_end, int channels,
                                          bool vector_loads, const uint8_t* padding, int64_t padding_stride) {
  constexpr int kChunk = 16 / sizeof(T);
  const int chunks_per_row = width / kChunk;
  for (int i = threadIdx.x; i < ROWS * chunks_per_row; i += THREADS) {
    const int r = i / chunks_per_row;
    const int c = (i % chunks_per_row) * kChunk;
    const int row = row0 + r;
    const bool live = row < rows_end && (padding == nullptr || padding[row * padding_stride] == 0);
    load_chunk(smem + r * smem_stride + c, global + row * row_stride, c, channels, channel_stride, live,
               vector_loads);
  }
}

// Writes finished rows: with one split, out (+ residual) in T and lse; with several,
// the split's fp32 partial output and lse, which merge_splits combines.
template <typename T>
struct RowWriter {
  bool partial;
  int head_dim_v;
  T* out;
  int64_t out_row_stride, out_channel_stride;
  const T* residual;
  int64_t residual_row_stride, residual_channel_stride;
  float* lse;
  float* partial_out;

  __device__ RowWriter(const ForwardParams& p, const BlockWork& work)
      : partial(p.num_splits > 1),
        head_dim_v(p.head_dim_v),
        out(static_cast<T*>(p.out) + work.batch * p.out_stride[0] + work.head * p.out_stride[1]),
        out_row_stride(p.out_stride[2]),
        out_channel_stride(p.out_stride[3]),
        residual(p.residual == nullptr ? nullptr : work.rows<T>(p.residual, p.residual_stride)),
        residual_row_stride(p.residual_stride[2]),
        residual_channel_stride(p.residual_stride[3]) {
    const int64_t bh = static_cast<int64_t>(work.batch) * p.heads + work.head;
    if (partial) {
      const int64_t rows = (bh * p.num_splits + work.split) * p.num_queries;
      lse = p.partial_lse + rows;
      partial_out = p.partial_out + rows * p.head_dim_v;
    } else {
      lse = p.lse + bh * p.num_queries;
      partial_out = nullptr;
    }
  }

  // Element (row, channel) of the normalised attention output.
  __device__ __forceinline__ void value(int row, int channel, float x) const {
    if (partial) {
      partial_out[static_cast<int64_t>(row) * head_dim_v + channel] = x;
      return;
    }
    if (residual != nullptr) x += to_float(residual[row * residual_row_stride + channel * residual_channel_stride]);
    out[row * out_row_stride + channel * out_channel_stride] = from_float<T>(x);
  }

  // Channels (channel, channel + 1), when LaunchPlan::paired_stores allows one store.
  __device__ __forceinline__ void value_pair(int row, int channel, float x0, float x1) const {
    if (partial) {
      *reinterpret_cast<float2*>(partial_out + static_cast<int64_t>(row) * head_dim_v + channel) = make_float2(x0, x1);
      return;
    }
    if (residual != nullptr) {
      const T* r = residual + row * residual_row_stride + channel * residual_channel_stride;
      x0 += to_float(r[0]);
      x1 += to_float(r[residual_channel_stride]);
    }
    *reinterpret_cast<uint32_t*>(out + row * out_row_stride + channel) = pack_pair<T>(x0, x1);
  }

  // The row's log-sum-exp (natural log) from its running max (log2 domain) and sum;
  // -inf for a row without attended keys.
  __device__ __forceinline__ void log_sum_exp(int row, float max_log2, float sum) const {
    lse[row] = sum > 0.0f ? (max_log2 + log2f(sum)) * kLn2 : -INFINITY;
  }
};

}  // namespace pk
