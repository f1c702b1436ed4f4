// From ForwardParams to a launch: the compiled head dims, the launch plan (grid, tiles
// per block, resident K/V, shared memory), the kernel of the dtype, and the merge.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "forward.h"
#include "forward_config.h"
#include "launch_plan.h"

namespace pk {
namespace {

// A resident block should leave room for a second one on its SM, so that one block's
// loads overlap the other's math.
constexpr int kResidentBlocksPerSm = 2;
// Query tiles per resident block: enough blocks for this many per SM over the whole
// grid, so the last wave is short, while each block reuses its K/V many times.
constexpr int kResidentBlocksPerSmOfWork = 8;

struct DeviceLimits {
  int multiprocessors = 0;
  int shared_per_block = 0;  // opt-in maximum of dynamic shared memory per block
  int shared_per_sm = 0;
};

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

DeviceLimits query_device_limits(int device) {
  DeviceLimits limits;
  check(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  check(cudaDeviceGetAttribute(&limits.shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  check(cudaDeviceGetAttribute(&limits.shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerMultiprocessor)");
  return limits;
}

// The limits never change while the process runs; asked once per device.
const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> known;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(device);
  if (found == known.end()) found = known.emplace(device, query_device_limits(device)).first;
  return found->second;
}

// Makes `device` current for the launches and restores the caller's device after.
// Restores only a device it changed: cudaSetDevice creates a context on its device,
// and a thread that never chose one reports device 0, so restoring unconditionally
// would give every process of a multi-GPU job a context on GPU 0. The Python launcher
// makes the tensors' device current first, so normally nothing changes here.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    changed_ = previous_ != device;
    if (changed_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

bool aligned_rows(const void* base, const int64_t (&stride)[4], int element_bytes) {
  const int64_t chunk = 16 / element_bytes;
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[3] == 1 && stride[0] % chunk == 0 &&
         stride[1] % chunk == 0 && stride[2] % chunk == 0;
}

template <typename T>
void launch_for_dims(const ForwardParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.dims.wide) {
    if constexpr (std::is_same_v<T, float>) {
      launch_wide_simt_forward<config::kWideSimtLaneChannels>(p, plan, stream);
    } else {
      launch_wide_tensor_core_forward<T>(p, plan, stream);
    }
    return;
  }
#define PK_LAUNCH_IF_DIMS(DQK, DV)                                            \
  if (plan.dims.qk == DQK && plan.dims.v == DV) {                             \
    if constexpr (std::is_same_v<T, float>) {                                 \
      launch_simt_forward<DQK, DV>(p, plan, stream);                          \
    } else {                                                                  \
      launch_tensor_core_forward<T, DQK, DV>(p, plan, stream);                \
    }                                                                         \
    return;                                                                   \
  }
  PK_FORWARD_HEAD_DIMS(PK_LAUNCH_IF_DIMS)
#undef PK_LAUNCH_IF_DIMS
  throw std::invalid_argument("no compiled kernel for head dims " + std::to_string(plan.dims.qk) + "/" +
                              std::to_string(plan.dims.v));
}

// How the tensor-core kernels move data: cp.async when q, k, v rows are 16-byte aligned,
// and channel pairs stored at once when the output holds them aligned.
void plan_tensor_core_memory_access(const ForwardParams& p, LaunchPlan& plan) {
  plan.vector_loads = aligned_rows(p.q, p.q_stride, 2) && aligned_rows(p.k, p.k_stride, 2) &&
                      aligned_rows(p.v, p.v_stride, 2);
  // Split partials are contiguous fp32 rows of Dv; out must hold aligned pairs itself.
  const bool out_pairs = reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.out_stride[3] == 1 &&
                         p.out_stride[0] % 2 == 0 && p.out_stride[1] % 2 == 0 && p.out_stride[2] % 2 == 0;
  plan.paired_stores = p.head_dim_v % 2 == 0 && (p.num_splits > 1 || out_pairs);
}

// The wide kernels' plan: Dv cut into the fewest equal slices that a block's
// registers hold (slices of whole MMA tiles, or whole lanes' channels for fp32), one
// block per (query tile, slice), and (tensor cores) the query tile resident when the
// block then fits the shared-memory budget. Returns the grid's x: query tiles x slices.
unsigned plan_wide_launch(const ForwardParams& p, LaunchPlan& plan) {
  int query_tiles = 0;
  if (p.dtype == DType::kFloat32) {
    plan.threads = config::kSimtThreads;
    plan.value_slices = config::cdiv(p.head_dim_v, config::kWideSimtBlockChannels);
    plan.slice_channels = config::round_up(config::cdiv(p.head_dim_v, plan.value_slices), 32);
    plan.shared_bytes = config::wide_simt_shared_bytes(plan.slice_channels);
    query_tiles = config::cdiv(p.num_queries, config::kSimtBlockM);
  } else {
    plan.threads = config::kWideThreads;
    plan_tensor_core_memory_access(p, plan);
    plan.value_slices = config::cdiv(plan.dims.v, config::kWideBlockChannels);
    plan.slice_channels = 2 * config::round_up(config::cdiv(plan.dims.v, 2 * plan.value_slices), 16);
    const config::WideTensorCoreLayout resident(plan.dims.qk, plan.slice_channels, true);
    plan.q_resident = resident.bytes() <= config::kWideSharedBudget;
    plan.shared_bytes = plan.q_resident ? resident.bytes()
                                        : config::WideTensorCoreLayout(plan.dims.qk, plan.slice_channels, false).bytes();
    query_tiles = config::cdiv(p.num_queries, config::kWideBlockM);
  }
  return static_cast<unsigned>(query_tiles * plan.value_slices);
}

}  // namespace

std::vector<HeadDims> compiled_head_dims() {
  std::vector<HeadDims> pairs;
#define PK_APPEND_DIMS(DQK, DV) pairs.push_back(HeadDims{DQK, DV});
  PK_FORWARD_HEAD_DIMS(PK_APPEND_DIMS)
#undef PK_APPEND_DIMS
  // Cheapest first: the work per key grows with Dqk + Dv.
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const HeadDims& a, const HeadDims& b) { return a.qk + a.v < b.qk + b.v; });
  return pairs;
}

HeadDims select_head_dims(int head_dim_qk, int head_dim_v) {
  if (head_dim_qk < 1 || head_dim_v < 1) return {};
  for (const HeadDims& dims : compiled_head_dims()) {
    if (head_dim_qk <= dims.qk && head_dim_v <= dims.v) return dims;
  }
  if (head_dim_qk <= config::kWideMaxHeadDim && head_dim_v <= config::kWideMaxHeadDim) {
    return HeadDims{config::round_up(head_dim_qk, config::kWideHeadDimMultiple),
                    config::round_up(head_dim_v, config::kWideHeadDimMultiple), true};
  }
  return {};
}

void check_forward_params(const ForwardParams& p) {
  if (p.batch < 1 || p.heads < 1 || p.num_queries < 1 || p.num_keys < 1) {
    throw std::invalid_argument("batch, heads, num_queries and num_keys must all be at least 1");
  }
  if (static_cast<int64_t>(p.batch) * p.heads > config::kMaxBatchHeads) {
    throw std::invalid_argument("batch * heads must be at most " + std::to_string(config::kMaxBatchHeads) +
                                " (one grid dimension), got " +
                                std::to_string(static_cast<int64_t>(p.batch) * p.heads));
  }
  if (select_head_dims(p.head_dim_qk, p.head_dim_v).qk == 0) {
    std::string pairs;
    for (const HeadDims& dims : compiled_head_dims()) {
      pairs += (pairs.empty() ? "" : ", ") + std::to_string(dims.qk) + "/" + std::to_string(dims.v);
    }
    throw std::invalid_argument("no compiled kernel serves head dims Dqk=" + std::to_string(p.head_dim_qk) +
                                " Dv=" + std::to_string(p.head_dim_v) +
                                "; compiled Dqk/Dv pairs (smaller dims are padded up): " + pairs +
                                "; other dims up to " + std::to_string(config::kWideMaxHeadDim) +
                                " run on the wide kernels");
  }
  const std::pair<const void*, const char*> required[] = {
      {p.q, "q"}, {p.k, "k"}, {p.v, "v"}, {p.out, "out"}, {p.lse, "lse"}};
  for (const auto& [pointer, name] : required) {
    if (pointer == nullptr) throw std::invalid_argument(std::string(name) + " is a null pointer");
  }
  if (p.num_splits < 1 || p.num_splits > 65535 || p.keys_per_split < 1 ||
      static_cast<int64_t>(p.num_splits) * p.keys_per_split < p.num_keys ||
      static_cast<int64_t>(p.num_splits - 1) * p.keys_per_split >= p.num_keys) {
    throw std::invalid_argument("num_splits (1..65535) chunks of keys_per_split keys must cover num_keys=" +
                                std::to_string(p.num_keys) + ", each starting inside it; got " +
                                std::to_string(p.num_splits) + " * " + std::to_string(p.keys_per_split));
  }
  if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) {
    throw std::invalid_argument("num_splits > 1 needs partial_out and partial_lse buffers");
  }
}

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    throw std::runtime_error(std::string(what) + " has no code for this GPU (" + cudaGetErrorString(status) +
                             "): reinstall with PERCEIVER_KERNELS_CUDA_ARCHS naming its architecture");
  }
  check(status, what);
}

void allow_shared_memory(const void* kernel, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;  // the default limit
  // Always the device's maximum, never the call's own need: concurrent callers with
  // different plans then cannot lower the limit under each other's launch.
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             device_limits(device).shared_per_block),
        (std::string("cudaFuncSetAttribute(") + what + ", MaxDynamicSharedMemorySize)").c_str());
}

LaunchPlan plan_launch(const ForwardParams& p) {
  const DeviceLimits& limits = device_limits(p.device);
  LaunchPlan plan;
  plan.dims = select_head_dims(p.head_dim_qk, p.head_dim_v);
  const unsigned splits = static_cast<unsigned>(p.num_splits);
  const unsigned batch_heads = static_cast<unsigned>(p.batch * p.heads);

  if (plan.dims.wide) {
    plan.grid = dim3(plan_wide_launch(p, plan), splits, batch_heads);
  } else if (p.dtype == DType::kFloat32) {
    plan.threads = config::kSimtThreads;
    plan.shared_bytes = config::simt_shared_bytes(plan.dims);
    plan.grid = dim3(config::cdiv(p.num_queries, config::kSimtBlockM), splits, batch_heads);
  } else {
    plan.threads = config::kTensorCoreThreads;
    plan_tensor_core_memory_access(p, plan);
    const int query_tiles = config::cdiv(p.num_queries, config::kTensorCoreBlockM);
    const int key_tiles = config::cdiv(std::min(p.keys_per_split, p.num_keys), config::kTensorCoreBlockN);
    const size_t resident_bytes = config::tensor_core_shared_bytes(plan.dims, key_tiles);
    const size_t resident_limit = std::min<size_t>(limits.shared_per_block,
                                                   limits.shared_per_sm / kResidentBlocksPerSm - 1024);
    // Resident K/V pay when each block then runs several query tiles over them; with
    // one tile per block the two streaming buffers overlap loads and math better.
    const int64_t total_tiles = static_cast<int64_t>(query_tiles) * splits * batch_heads;
    const int64_t wanted_blocks = static_cast<int64_t>(kResidentBlocksPerSmOfWork) * limits.multiprocessors;
    const int tiles_per_block = static_cast<int>(std::clamp<int64_t>(total_tiles / wanted_blocks, 1, query_tiles));
    plan.kv_resident = tiles_per_block >= 2 && resident_bytes <= resident_limit;
    if (plan.kv_resident) {
      plan.query_tiles_per_block = tiles_per_block;
      plan.kv_slots = key_tiles;
      plan.shared_bytes = resident_bytes;
    } else {
      plan.shared_bytes = config::tensor_core_shared_bytes(plan.dims, plan.kv_slots);
    }
    plan.grid = dim3(config::cdiv(query_tiles, plan.query_tiles_per_block), splits, batch_heads);
  }
  if (plan.shared_bytes > static_cast<size_t>(limits.shared_per_block)) {
    throw std::invalid_argument("head dims " + std::to_string(plan.dims.qk) + "/" + std::to_string(plan.dims.v) +
                                " need " + std::to_string(plan.shared_bytes) +
                                " bytes of shared memory per block; this GPU allows " +
                                std::to_string(limits.shared_per_block));
  }
  return plan;
}

void run_forward(const ForwardParams& params, cudaStream_t stream) {
  DeviceGuard guard(params.device);
  const LaunchPlan plan = plan_launch(params);
  switch (params.dtype) {
    case DType::kFloat32: launch_for_dims<float>(params, plan, stream); break;
    case DType::kFloat16: launch_for_dims<__half>(params, plan, stream); break;
    case DType::kBFloat16: launch_for_dims<__nv_bfloat16>(params, plan, stream); break;
  }
  if (params.num_splits > 1) merge_splits(params, stream);
}

}  // namespace pk
