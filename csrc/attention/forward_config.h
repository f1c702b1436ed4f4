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

}  // namespace pk::config
