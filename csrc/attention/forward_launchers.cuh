// Launchers of the forward kernels, compiled once per (dtype, head dims) by the files
// in instantiations/ (the wide kernels once per dtype). The kernels themselves live in
// forward_tensor_core.cuh, forward_simt.cuh and forward_wide_*.cuh, free of launch syntax.
#pragma once

#include "launch_plan.h"
#include "forward_simt.cuh"
#include "forward_tensor_core.cuh"
#include "forward_wide_simt.cuh"
#include "forward_wide_tensor_core.cuh"

namespace pk {

template <typename T, int DQK, int DV>
void launch_tensor_core_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(&forward_tensor_core_kernel<T, DQK, DV>);
  allow_shared_memory(kernel, plan.shared_bytes, "forward_tensor_core_kernel");
  forward_tensor_core_kernel<T, DQK, DV><<<plan.grid, plan.threads, plan.shared_bytes, stream>>>(params, plan);
  check_launch("forward_tensor_core_kernel");
}

template <int DQK, int DV>
void launch_simt_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(&forward_simt_kernel<DQK, DV>);
  allow_shared_memory(kernel, plan.shared_bytes, "forward_simt_kernel");
  forward_simt_kernel<DQK, DV><<<plan.grid, plan.threads, plan.shared_bytes, stream>>>(params, plan);
  check_launch("forward_simt_kernel");
}

template <typename T>
void launch_wide_tensor_core_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(&forward_wide_tensor_core_kernel<T>);
  allow_shared_memory(kernel, plan.shared_bytes, "forward_wide_tensor_core_kernel");
  forward_wide_tensor_core_kernel<T><<<plan.grid, plan.threads, plan.shared_bytes, stream>>>(params, plan);
  check_launch("forward_wide_tensor_core_kernel");
}

template <int LANE_CHANNELS>
void launch_wide_simt_forward(const ForwardParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(&forward_wide_simt_kernel<LANE_CHANNELS>);
  allow_shared_memory(kernel, plan.shared_bytes, "forward_wide_simt_kernel");
  forward_wide_simt_kernel<LANE_CHANNELS><<<plan.grid, plan.threads, plan.shared_bytes, stream>>>(params, plan);
  check_launch("forward_wide_simt_kernel");
}

}  // namespace pk

#define PK_INSTANTIATE_TENSOR_CORE_FORWARD(T, DQK, DV)                                                        \
  template void pk::launch_tensor_core_forward<T, DQK, DV>(const pk::ForwardParams&, const pk::LaunchPlan&, \
                                                           cudaStream_t);

#define PK_INSTANTIATE_SIMT_FORWARD(DQK, DV) \
  template void pk::launch_simt_forward<DQK, DV>(const pk::ForwardParams&, const pk::LaunchPlan&, cudaStream_t);

#define PK_INSTANTIATE_WIDE_TENSOR_CORE_FORWARD(T) \
  template void pk::launch_wide_tensor_core_forward<T>(const pk::ForwardParams&, const pk::LaunchPlan&, cudaStream_t);

#define PK_INSTANTIATE_WIDE_SIMT_FORWARD(LANE_CHANNELS)                                                    \
  template void pk::launch_wide_simt_forward<LANE_CHANNELS>(const pk::ForwardParams&, const pk::LaunchPlan&, \
                                                            cudaStream_t);
