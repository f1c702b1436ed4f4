// Runs the real forward kernels of csrc/attention/ on the CPU, for tests without a GPU.
//
// The kernel headers are compiled by the host compiler next to the emulated
// device_utils.cuh of this folder (tests/cuda_emulation/__init__.py stages them):
// every CUDA thread of a block is a fiber, __syncthreads is a barrier, and warp-wide
// instructions are collectives. Blocks run one after another and share one buffer as
// shared memory. cp.async completes at once, so asynchronous-copy races are not
// modelled; everything else (lane addressing, fragment layouts, masking, the online
// softmax, the epilogue, split partials and the merge, strides, resident K/V over
// several query tiles) runs as written.
//
// The C entry point takes the launch plan's choices as arguments, so tests can force
// each path (resident or streaming K/V, vector or element-wise loads, paired stores).
#include "device_utils.cuh"
#include "forward_simt.cuh"
#include "forward_tensor_core.cuh"
#include "merge_splits.cuh"

#include <cstdio>
#include <vector>

namespace pk {

constexpr size_t kSharedBufferBytes = 1 << 20;
alignas(16) unsigned char shared_raw[kSharedBufferBytes];

namespace {

template <typename Body>
void run_grid(dim3 grid, int threads, Body body) {
  emulation::Barrier block(threads);
  std::vector<emulation::Warp> warps(threads / 32);
  std::vector<emulation::ThreadState> initial(threads);
  for (int t = 0; t < threads; ++t) {
    initial[t].thread_index = make_uint3(t, 0, 0);
    initial[t].warp = &warps[t / 32];
    initial[t].lane = t % 32;
  }
  gridDim = grid;
  blockDim = dim3(threads);
  emulation::block_barrier = &block;
  emulation::run_fibers(initial, [&] {
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

template <typename T, int DQK, int DV>
void forward(const ForwardParams& p, const LaunchPlan& plan) {
  if constexpr (std::is_same_v<T, float>) {
    run_grid(plan.grid, plan.threads, [&] { forward_simt_kernel<DQK, DV>(p, plan); });
  } else {
    run_grid(plan.grid, plan.threads, [&] { forward_tensor_core_kernel<T, DQK, DV>(p, plan); });
  }
}

template <typename T>
void forward_for_dims(const ForwardParams& p, const LaunchPlan& plan) {
#define PK_EMULATE_IF_DIMS(DQK, DV) \
  if (plan.dims.qk == DQK && plan.dims.v == DV) return forward<T, DQK, DV>(p, plan);
  PK_FORWARD_HEAD_DIMS(PK_EMULATE_IF_DIMS)
#undef PK_EMULATE_IF_DIMS
  throw std::invalid_argument("no compiled pair " + std::to_string(plan.dims.qk) + "/" + std::to_string(plan.dims.v));
}

template <typename T>
void merge(const ForwardParams& p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.num_queries;
  run_grid(dim3(static_cast<unsigned>((rows + kMergeWarps - 1) / kMergeWarps)), 32 * kMergeWarps,
           [&] { merge_splits_kernel<T>(p); });
}

// The forward, then the merge when split, as run_forward does on a GPU.
template <typename T>
void run(const ForwardParams& p, const LaunchPlan& plan) {
  forward_for_dims<T>(p, plan);
  if (p.num_splits > 1) merge<T>(p);
}

}  // namespace
}  // namespace pk

extern "C" int pk_emulate_forward(int dtype, const void* q, const int64_t* q_stride, const void* k,
                                  const int64_t* k_stride, const void* v, const int64_t* v_stride,
                                  const uint8_t* key_padding, const int64_t* key_padding_stride, const void* residual,
                                  const int64_t* residual_stride, void* out, const int64_t* out_stride, float* lse,
                                  float* partial_out, float* partial_lse, int batch, int heads, int num_queries,
                                  int num_keys, int head_dim_qk, int head_dim_v, int compiled_qk, int compiled_v,
                                  float scale, int num_splits, int keys_per_split, int kv_resident,
                                  int query_tiles_per_block, int vector_loads, int paired_stores, char* error,
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
    for (int i = 0; i < 4; ++i) {
      p.q_stride[i] = q_stride[i];
      p.k_stride[i] = k_stride[i];
      p.v_stride[i] = v_stride[i];
      p.out_stride[i] = out_stride[i];
      if (residual != nullptr) p.residual_stride[i] = residual_stride[i];
    }
    if (key_padding != nullptr) {
      p.key_padding_stride[0] = key_padding_stride[0];
      p.key_padding_stride[1] = key_padding_stride[1];
    }
    p.batch = batch;
    p.heads = heads;
    p.num_queries = num_queries;
    p.num_keys = num_keys;
    p.head_dim_qk = head_dim_qk;
    p.head_dim_v = head_dim_v;
    p.scale = scale;
    p.num_splits = num_splits;
    p.keys_per_split = keys_per_split;

    LaunchPlan plan;
    plan.dims = HeadDims{compiled_qk, compiled_v};
    plan.vector_loads = vector_loads != 0;
    plan.paired_stores = paired_stores != 0;
    const unsigned batch_heads = static_cast<unsigned>(batch * heads);
    if (p.dtype == DType::kFloat32) {
      plan.threads = config::kSimtThreads;
      plan.shared_bytes = config::simt_shared_bytes(plan.dims);
      plan.grid = dim3(config::cdiv(num_queries, config::kSimtBlockM), num_splits, batch_heads);
    } else {
      plan.threads = config::kTensorCoreThreads;
      plan.kv_resident = kv_resident != 0;
      plan.query_tiles_per_block = query_tiles_per_block;
      if (plan.kv_resident) {
        plan.kv_slots = config::cdiv(std::min(keys_per_split, num_keys), config::kTensorCoreBlockN);
      }
      plan.shared_bytes = config::tensor_core_shared_bytes(plan.dims, plan.kv_slots);
      plan.grid = dim3(config::cdiv(config::cdiv(num_queries, config::kTensorCoreBlockM), query_tiles_per_block),
                       num_splits, batch_heads);
    }
    if (plan.shared_bytes > kSharedBufferBytes) throw std::invalid_argument("plan needs too much shared memory");
    switch (p.dtype) {
      case DType::kFloat32: run<float>(p, plan); break;
      case DType::kFloat16: run<__half>(p, plan); break;
      case DType::kBFloat16: run<__nv_bfloat16>(p, plan); break;
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return 1;
  }
}
