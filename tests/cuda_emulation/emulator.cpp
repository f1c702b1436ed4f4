// Runs the real forward path of csrc/attention/ on the CPU, for tests without a GPU.
//
// The kernel headers and forward_dispatch.cu are compiled by the host compiler next to
// the emulated device_utils.cuh of this folder (tests/cuda_emulation/__init__.py stages
// them). What runs is the production code: argument checks, head-dim selection, the
// launch plan (tiles per block, resident or streaming K/V, vector loads, paired
// stores), the kernels and the merge. This file supplies only what a GPU would:
//   - the launchers, which run a grid block after block, every CUDA thread a fiber,
//     __syncthreads a barrier, warp-wide instructions collectives (device_utils.cuh);
//   - the few CUDA runtime calls the dispatch makes, answering for emulated devices:
//     device N has N multiprocessors (the dispatch caches limits per device), and few
//     SMs make small problems take the resident-K/V plan a real GPU takes for large ones.
// cp.async completes at once, so asynchronous-copy races are not modelled.
#include "device_utils.cuh"
#include "forward_simt.cuh"
#include "forward_tensor_core.cuh"
#include "merge_splits.cuh"

#include <cstdio>
#include <vector>

namespace pk {

constexpr size_t kSharedBufferBytes = 1 << 20;
alignas(16) unsigned char shared_raw[kSharedBufferBytes];

namespace emulation {

// The emulated devices: an H100's shared memory, as many SMs as the device index.
constexpr int kSharedPerBlock = 227 * 1024;
constexpr int kSharedPerSm = 228 * 1024;

template <typename Body>
void run_grid(dim3 grid, int threads, size_t shared_bytes, Body body) {
  if (shared_bytes > kSharedBufferBytes) throw std::invalid_argument("the plan needs more shared memory than emulated");
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
          body();
          __syncthreads();  // the next block reuses shared memory
        }
      }
    }
  });
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

#include "forward_dispatch.cu"

// The CUDA runtime as forward_dispatch.cu sees it: one emulated device, no errors.
extern "C" {
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = device; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = pk::emulation::kSharedPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = pk::emulation::kSharedPerSm; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
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

// The fields of pk::ForwardParams, flat for ctypes; returns 0, or 1 with the message.
int pk_emulate_forward(int dtype, const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                       const void* v, const int64_t* v_stride, const uint8_t* key_padding,
                       const int64_t* key_padding_stride, const void* residual, const int64_t* residual_stride,
                       void* out, const int64_t* out_stride, float* lse, float* partial_out, float* partial_lse,
                       int batch, int heads, int num_queries, int num_keys, int head_dim_qk, int head_dim_v,
                       float scale, int num_splits, int keys_per_split, int multiprocessors, char* error,
                       int error_size) {
  using namespace pk;
  try {
    ForwardParams p;
    p.dtype = static_cast<DType>(dtype);
    p.q = q;
    p.k = k;
    p.v = v;
    p.key_padding = key_padding;
    p.residual = residual;
    p.out = out;
    p.lse = lse;
    p.partial_out = partial_out;
    p.partial_lse = partial_lse;
    std::copy(q_stride, q_stride + 4, p.q_stride);
    std::copy(k_stride, k_stride + 4, p.k_stride);
    std::copy(v_stride, v_stride + 4, p.v_stride);
    std::copy(out_stride, out_stride + 4, p.out_stride);
    if (residual != nullptr) std::copy(residual_stride, residual_stride + 4, p.residual_stride);
    if (key_padding != nullptr) std::copy(key_padding_stride, key_padding_stride + 2, p.key_padding_stride);
    p.batch = batch;
    p.heads = heads;
    p.num_queries = num_queries;
    p.num_keys = num_keys;
    p.head_dim_qk = head_dim_qk;
    p.head_dim_v = head_dim_v;
    p.scale = scale;
    p.num_splits = num_splits;
    p.keys_per_split = keys_per_split;
    p.device = multiprocessors;
    run_forward(p, nullptr);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return 1;
  }
}

// The plan run_forward would launch with, for tests of the planner.
int pk_emulate_plan(int dtype, int batch, int heads, int num_queries, int num_keys, int head_dim_qk, int head_dim_v,
                    int num_splits, int keys_per_split, int multiprocessors, int* kv_resident,
                    int* query_tiles_per_block, int* grid_x) {
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
  return 0;
}
}
