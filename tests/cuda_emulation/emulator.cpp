// Runs the real CUDA extension of csrc/ on the CPU, for tests without a GPU.
//
// This file compiles the extension's own sources with the host compiler into a Python
// module named _C, like the real one: the pybind11 binding (csrc/perceiver_kernels.cpp,
// every argument check and the filling of pk::ForwardParams), the dispatch
// (head-dim selection, launch plan, merge call) and the kernels, next to the emulated
// device_utils.cuh of this folder (tests/cuda_emulation/__init__.py stages them).
// perceiver_kernels/cuda_launch.py then drives it exactly as it drives the GPU build.
// This file supplies only what a GPU would:
//   - the launchers, which run a grid block after block, every CUDA thread a fiber,
//     __syncthreads a barrier, warp-wide instructions collectives (device_utils.cuh),
//     shared memory starting as NaN bytes and guarded past the plan's allocation;
//   - the CUDA runtime calls of the binding and the dispatch, answering for emulated
//     devices: device N has N multiprocessors (the dispatch caches limits per device),
//     so few SMs make small problems take the resident-K/V plan a real GPU takes for
//     large ones; every pointer is device memory of the device being emulated.
// cp.async completes at once, so asynchronous-copy races are not modelled.
#include <pybind11/pybind11.h>

#include "attention/device_utils.cuh"
#include "attention/forward_simt.cuh"
#include "attention/forward_tensor_core.cuh"
#include "attention/forward_wide_simt.cuh"
#include "attention/forward_wide_tensor_core.cuh"
#include "attention/merge_splits.cuh"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace pk {

constexpr size_t kSharedBufferBytes = 1 << 20;
alignas(16) unsigned char shared_raw[kSharedBufferBytes];

namespace emulation {

// The emulated devices: an H100's shared memory, as many SMs as the device index.
constexpr int kSharedPerBlock = 227 * 1024;
constexpr int kSharedPerSm = 228 * 1024;

// Shared memory starts undefined on a GPU: here every block's starts as 0xff bytes, NaN
// in every float format, so a value read before it is written shows in the results.
// Bytes past the block's allocation hold kGuard, checked after the grid: a kernel that
// strays past its plan's shared memory (which a GPU may not report) fails here.
constexpr unsigned char kUndefined = 0xff;
constexpr unsigned char kGuard = 0xa5;
constexpr size_t kGuardBytes = 64 * 1024;

template <typename Body>
void run_grid(dim3 grid, int threads, size_t shared_bytes, Body body) {
  if (shared_bytes + kGuardBytes > kSharedBufferBytes) {
    throw std::invalid_argument("the plan needs more shared memory than emulated");
  }
  std::memset(shared_raw + shared_bytes, kGuard, kGuardBytes);
  Barrier block(threads);
  std::vector<Warp> warps(threads / 32);
  std::vector<ThreadState> initial(threads);
  for (int t = 0; t < threads; ++t) {
    initial[t].thread_index = make_uint3(t, 0, 0);
    initial[t].warp = &warps[t / 32];
    initial[t].lane = t % 32;
  }
  gridDim = grid;
  blockDim = dim3(threads);
  block_barrier = &block;
  run_fibers(initial, [&] {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = make_uint3(x, y, z);
          if (threadIdx.x == 0) std::memset(shared_raw, kUndefined, shared_bytes);
          __syncthreads();
          body();
          __syncthreads();  // the next block reuses shared memory
        }
      }
    }
  });
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (shared_raw[shared_bytes + i] != kGuard) {
      throw std::logic_error("a kernel wrote shared memory at byte " + std::to_string(shared_bytes + i) +
                             ", past the " + std::to_string(shared_bytes) + " bytes its plan allocates");
    }
  }
}

}  // namespace emulation

template <typename T, int DQK, int DV>
void launch_tensor_core_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t) {
  emulation::run_grid(plan.grid, plan.threads, plan.shared_bytes,
                      [&] { forward_tensor_core_kernel<T, DQK, DV>(params, plan); });
}

template <int DQK, int DV>
void launch_simt_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t) {
  emulation::run_grid(plan.grid, plan.threads, plan.shared_bytes, [&] { forward_simt_kernel<DQK, DV>(params, plan); });
}

template <typename T>
void launch_wide_tensor_core_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t) {
  emulation::run_grid(plan.grid, plan.threads, plan.shared_bytes,
                      [&] { forward_wide_tensor_core_kernel<T>(params, plan); });
}

template <int LANE_CHANNELS>
void launch_wide_simt_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t) {
  emulation::run_grid(plan.grid, plan.threads, plan.shared_bytes,
                      [&] { forward_wide_simt_kernel<LANE_CHANNELS>(params, plan); });
}

template <typename T>
void emulate_merge(const ForwardParams& p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.num_queries;
  emulation::run_grid(dim3(static_cast<unsigned>((rows + kMergeWarps - 1) / kMergeWarps)), 32 * kMergeWarps, 0,
                      [&] { merge_splits_kernel<T>(p); });
}

void merge_splits(const ForwardParams& params, cudaStream_t) {
  switch (params.dtype) {
    case DType::kFloat32: return emulate_merge<float>(params);
    case DType::kFloat16: return emulate_merge<__half>(params);
    case DType::kBFloat16: return emulate_merge<__nv_bfloat16>(params);
  }
}

}  // namespace pk

#include "attention/forward_dispatch.cu"

#define PK_CUDA_VERSION "emulated"
#define PK_CUDA_ARCHS "emulated"
#define PK_BUILD_TYPE "emulated"
#include "perceiver_kernels.cpp"

namespace {
int emulated_device = 1;  // the device (= number of SMs) of the calls that follow
}  // namespace

extern "C" {
// Set through ctypes before a call: pointers then belong to this device.
void pk_emulation_select_device(int device) { emulated_device = device; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = device; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = pk::emulation::kSharedPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = pk::emulation::kSharedPerSm; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = emulated_device + 1;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void*) {
  attributes->type = cudaMemoryTypeDevice;
  attributes->device = emulated_device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
const char* cudaGetErrorString(cudaError_t) { return "emulated device"; }

// The plan run_forward would launch with, for tests of the planner.
int pk_emulate_plan(int dtype, int batch, int heads, int num_queries, int num_keys, int head_dim_qk, int head_dim_v,
                    int num_splits, int keys_per_split, int multiprocessors, int* kv_resident,
                    int* query_tiles_per_block, int* grid_x, int* threads, int* shared_bytes, int* wide,
                    int* value_slices, int* slice_channels, int* q_resident) {
  pk::ForwardParams p;
  p.dtype = static_cast<pk::DType>(dtype);
  p.batch = batch;
  p.heads = heads;
  p.num_queries = num_queries;
  p.num_keys = num_keys;
  p.head_dim_qk = head_dim_qk;
  p.head_dim_v = head_dim_v;
  p.num_splits = num_splits;
  p.keys_per_split = keys_per_split;
  p.device = multiprocessors;
  const pk::LaunchPlan plan = pk::plan_launch(p);
  *kv_resident = plan.kv_resident;
  *query_tiles_per_block = plan.query_tiles_per_block;
  *grid_x = static_cast<int>(plan.grid.x);
  *threads = plan.threads;
  *shared_bytes = static_cast<int>(plan.shared_bytes);
  *wide = plan.dims.wide;
  *value_slices = plan.value_slices;
  *slice_channels = plan.slice_channels;
  *q_resident = plan.q_resident;
  return 0;
}
}
