// Launch of the split merge (merge_splits.cuh) for each dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>

#include "forward.h"
#include "launch_plan.h"
#include "merge_splits.cuh"

namespace pk {
namespace {

// Enough blocks to fill any GPU several times over; the kernel loops over the rest.
constexpr int64_t kMaxMergeBlocks = 1 << 20;

template <typename T>
void launch_merge(const ForwardParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.num_queries;
  const int64_t blocks = std::min(kMaxMergeBlocks, (rows + kMergeWarps - 1) / kMergeWarps);
  merge_splits_kernel<T><<<static_cast<unsigned>(blocks), 32 * kMergeWarps, 0, stream>>>(p);
  check_launch("merge_splits_kernel");
}

}  // namespace

void merge_splits(const ForwardParams& params, cudaStream_t stream) {
  switch (params.dtype) {
    case DType::kFloat32: return launch_merge<float>(params, stream);
    case DType::kFloat16: return launch_merge<__half>(params, stream);
    case DType::kBFloat16: return launch_merge<__nv_bfloat16>(params, stream);
  }
  throw std::invalid_argument("merge_splits: unknown dtype");
}

}  // namespace pk
