// How a forward call is launched: the plan the host computes and the kernel reads, and
// the launchers that the instantiation files compile (defined in forward_launchers.cuh).
// Included by .cu files only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "forward.h"

namespace pk {

struct LaunchPlan {
  HeadDims dims;  // the compiled pair that runs (>= the problem's head dims)
  dim3 grid;      // (query tile groups, key splits, batch * heads)
  int threads = 0;
  size_t shared_bytes = 0;
  int query_tiles_per_block = 1;
  int kv_slots = 2;  // K/V tiles in shared memory: 2 buffers, or every tile of a split
  // Each block loads its split's K/V once and keeps them on chip for all its query
  // tiles (DECODE: the latents' K/V); otherwise K/V tiles stream through two buffers.
  bool kv_resident = false;
  // q, k, v rows are 16-byte aligned with unit channel stride, so tiles are copied
  // with cp.async; otherwise element by element with any strides.
  bool vector_loads = false;
  // Dv is even and out (or the split partials) holds channel pairs at 4-byte aligned
  // addresses, so each lane stores its two adjacent channels at once.
  bool paired_stores = false;
  // Wide kernels: grid.x enumerates (query tile, value slice), each block accumulating
  // slice_channels of Dv; the tensor-core kernel keeps the query tile in shared memory
  // when it fits the budget (else Q streams in chunks beside K).
  int value_slices = 1;
  int slice_channels = 0;
  bool q_resident = false;
};

// Chooses tiles, grid and shared memory for `params` on its device.
LaunchPlan plan_launch(const ForwardParams& params);

template <typename T, int DQK, int DV>
void launch_tensor_core_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream);

template <int DQK, int DV>
void launch_simt_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream);

template <typename T>
void launch_wide_tensor_core_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream);

template <int LANE_CHANNELS>
void launch_wide_simt_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream);

// Turns the last CUDA error into std::runtime_error naming `what`.
void check_launch(const char* what);

// Lets `kernel` use `bytes` of dynamic shared memory (above the default 48 KiB).
void allow_shared_memory(const void* kernel, size_t bytes, const char* what);

}  // namespace pk
