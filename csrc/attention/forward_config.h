// Tile shapes of the forward kernels, shared by the kernels and the host-side planner.
// Plain C++ (no CUDA syntax).
#pragma once

#include <cstddef>

#include "forward.h"

#ifdef __CUDACC__
#define PK_HOST_DEVICE __host__ __device__
#else
#define PK_HOST_DEVICE
#endif

namespace pk::config {

// The grid's third dimension enumerates batch * heads.
constexpr int kMaxBatchHeads = 65535;

// Tensor-core kernel (fp16, bf16): each warp owns 16 query rows of the tile.
constexpr int kTensorCoreWarps = 4;
constexpr int kTensorCoreThreads = 32 * kTensorCoreWarps;
constexpr int kTensorCoreBlockM = 16 * kTensorCoreWarps;
constexpr int kTensorCoreBlockN = 64;
// 16 bytes of padding per shared-memory row: the eight rows one ldmatrix reads then
// start in different banks.
constexpr int kSharedRowPad = 8;

// SIMT kernel (fp32, exact): each warp owns kSimtRowsPerWarp query rows; a lane owns
// one key of the tile for the scores and 1/32 of the value channels for the output.
constexpr int kSimtWarps = 4;
constexpr int kSimtThreads = 32 * kSimtWarps;
constexpr int kSimtRowsPerWarp = 8;
constexpr int kSimtBlockM = kSimtRowsPerWarp * kSimtWarps;
constexpr int kSimtBlockN = 32;

PK_HOST_DEVICE constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
PK_HOST_DEVICE constexpr int round_up(int a, int b) { return cdiv(a, b) * b; }

// Wide kernels: head dims that no compiled pair holds, up to kWideMaxHeadDim, as runtime
// sizes rounded up to a multiple of kWideHeadDimMultiple (261 runs as 272). Nothing in
// them is sized by the head dims: Q.K^T streams Dqk in chunks and Dv is cut into slices,
// so the bound is what the tests cover (the released Perceiver IO models reach 1280).
constexpr int kWideHeadDimMultiple = 16;
constexpr int kWideMaxHeadDim = 1280;
// Shared memory a wide block may take: the opt-in maximum of sm_86/sm_89, so the same
// plan runs on every sm_80+ GPU.
constexpr size_t kWideSharedBudget = 99 * 1024;

// Wide tensor-core kernel (fp16, bf16): eight warps over a 64-row query tile. Warp w
// owns query rows 16 (w % 4).. and, for the scores, keys 32 (w / 4).. of each 64-key
// tile; for the output, half w / 4 of the block's slice of value channels, so a row's
// accumulator is spread over two warps. The probabilities P meet in shared memory.
constexpr int kWideWarps = 8;
constexpr int kWideThreads = 32 * kWideWarps;
constexpr int kWideBlockM = 64;
constexpr int kWideBlockN = 64;
constexpr int kWideWarpKeys = kWideBlockN / 2;
// Dqk channels per step of Q.K^T, and keys per step of P.V.
constexpr int kWideChunk = 64;
constexpr int kWideValueKeys = 16;
// Value channels a warp accumulates in registers (16 rows x 256 fp32 = 128 registers a
// lane); a block takes two warps' worth, and wider Dv is cut into slices across blocks.
constexpr int kWideWarpChannels = 256;
constexpr int kWideBlockChannels = 2 * kWideWarpChannels;
// The split plan counts blocks of one query-row count per dtype (build_info).
static_assert(kWideBlockM == kTensorCoreBlockM, "wide and narrow fp16/bf16 kernels take the same query rows");

// Wide SIMT kernel (fp32): the narrow kernel's 32 rows and 32-key tiles, Dqk streamed in
// chunks of kWideChunk, and up to kWideSimtLaneChannels value channels a lane (a slice of
// 32 x that many channels a block).
constexpr int kWideSimtLaneChannels = 8;
constexpr int kWideSimtBlockChannels = 32 * kWideSimtLaneChannels;

// Shared memory of the tensor-core kernel: the query tile and `kv_slots` K/V tiles
// (2-byte elements), then one byte per key of each slot saying whether it is attended.
PK_HOST_DEVICE constexpr size_t tensor_core_tile_bytes(HeadDims dims, int kv_slots) {
  return 2 * (static_cast<size_t>(kTensorCoreBlockM) * (dims.qk + kSharedRowPad) +
              static_cast<size_t>(kv_slots) * kTensorCoreBlockN * (dims.qk + dims.v + 2 * kSharedRowPad));
}

constexpr size_t tensor_core_shared_bytes(HeadDims dims, int kv_slots) {
  return tensor_core_tile_bytes(dims, kv_slots) + static_cast<size_t>(kv_slots) * kTensorCoreBlockN;
}

// Shared memory of the SIMT kernel: the query tile, a K tile with rows padded to an odd
// stride (the lanes read one channel of 32 different keys), and a V tile.
constexpr size_t simt_shared_bytes(HeadDims dims) {
  return 4 * (static_cast<size_t>(kSimtBlockM) * dims.qk + static_cast<size_t>(kSimtBlockN) * (dims.qk + 1) +
              static_cast<size_t>(kSimtBlockN) * dims.v);
}

// Shared memory of the wide tensor-core kernel, in 2-byte elements from the start:
//   query tile (kWideBlockM x Dqk, only when it stays resident),
//   two stages, each a K chunk (and the Q chunk when Q streams) or a V step's rows,
//   the P tile (kWideBlockM x kWideBlockN),
// then fp32 row statistics (each half's row max, then row sum) and one byte per key of
// the tile saying whether it is attended. Rows are padded by kSharedRowPad elements;
// with row lengths that are multiples of 16 the eight rows one ldmatrix reads then
// start in different banks.
struct WideTensorCoreLayout {
  static constexpr int kChunkStride = kWideChunk + kSharedRowPad;
  static constexpr int kChunkElements = kWideBlockN * kChunkStride;
  static constexpr int kPStride = kWideBlockN + kSharedRowPad;

  int q_stride;      // elements per row of the resident query tile
  int value_stride;  // elements per row of a V step's tile
  int q_elements;    // 0 when Q streams
  int stage_elements;

  PK_HOST_DEVICE constexpr WideTensorCoreLayout(int qk_padded, int slice_channels, bool q_resident)
      : q_stride(qk_padded + kSharedRowPad),
        value_stride(slice_channels + kSharedRowPad),
        q_elements(q_resident ? kWideBlockM * (qk_padded + kSharedRowPad) : 0),
        stage_elements((q_resident ? 1 : 2) * kChunkElements > kWideValueKeys * (slice_channels + kSharedRowPad)
                           ? (q_resident ? 1 : 2) * kChunkElements
                           : kWideValueKeys * (slice_channels + kSharedRowPad)) {}

  PK_HOST_DEVICE constexpr int stage(int s) const { return q_elements + s * stage_elements; }
  PK_HOST_DEVICE constexpr int p_tile() const { return stage(2); }
  PK_HOST_DEVICE constexpr size_t stats_bytes_offset() const {
    return 2 * static_cast<size_t>(p_tile() + kWideBlockM * kPStride);
  }
  PK_HOST_DEVICE constexpr size_t key_live_bytes_offset() const {
    return stats_bytes_offset() + 4 * sizeof(float) * kWideBlockM;
  }
  PK_HOST_DEVICE constexpr size_t bytes() const { return key_live_bytes_offset() + kWideBlockN; }
};

// Shared memory of the wide SIMT kernel: a Q chunk, a K chunk with rows padded to an odd
// stride (the lanes read one channel of 32 different keys) and a V tile of the slice.
constexpr size_t wide_simt_shared_bytes(int slice_channels) {
  return 4 * (static_cast<size_t>(kSimtBlockM) * kWideChunk + static_cast<size_t>(kSimtBlockN) * (kWideChunk + 1) +
              static_cast<size_t>(kSimtBlockN) * slice_channels);
}

}  // namespace pk::config
