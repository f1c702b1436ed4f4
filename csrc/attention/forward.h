// The forward attention kernels as the host code sees them: plain C++, no CUDA syntax,
// so the pybind11 entry file (compiled by the host compiler) can include it.
//
//   out = softmax(q k^T * scale, keys masked by key_padding) v (+ residual)
//
// With causal masking, query row i also sees only keys j <= i + Nk - Nq (aligned at the
// bottom right, as Perceiver AR's latents are the last positions of the context).
//
// Work is cut into (query tile, key split, batch*head) blocks. With one split a block
// writes `out` and `lse` directly; with several, each split writes fp32 partials (its
// own normalised output and log-sum-exp) and merge_splits combines them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pk {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// The compiled (Dqk, Dv) head-dim pairs: the dims users need most (32, 64, 128) and the
// pairs of the pretrained Perceiver IO language model (32/96, 32/160). Smaller dims run
// on the smallest pair that holds them, zero-padded on chip. Each pair has one
// instantiation file per dtype in attention/instantiations/ (a test checks they agree).
// Dims that no pair holds, up to config::kWideMaxHeadDim, run on the wide kernels
// (forward_wide_*.cuh), one instantiation per dtype, with the dims as runtime sizes.
#define PK_FORWARD_HEAD_DIMS(X) X(32, 32) X(64, 64) X(32, 96) X(128, 128) X(32, 160)

// The head dims a kernel runs: a compiled pair, or (wide) the problem's dims rounded up
// to a multiple of config::kWideHeadDimMultiple.
struct HeadDims {
  int qk = 0;
  int v = 0;
  bool wide = false;
};

struct ForwardParams {
  DType dtype = DType::kFloat32;
  int device = 0;

  // Inputs in (batch, head, row, channel) order, with element strides for each.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const uint8_t* key_padding = nullptr;  // (batch, key) bytes, nonzero = padding; may be null
  const void* residual = nullptr;        // like out; may be null
  int64_t q_stride[4] = {};
  int64_t k_stride[4] = {};
  int64_t v_stride[4] = {};
  int64_t key_padding_stride[2] = {};
  int64_t residual_stride[4] = {};

  // Outputs: out in the dtype of q with any strides, lse (batch*head, Nq) fp32 natural log.
  void* out = nullptr;
  float* lse = nullptr;
  int64_t out_stride[4] = {};

  // Split-KV: with num_splits > 1 the kernels write contiguous fp32 partials,
  // partial_out (batch*head, split, Nq, Dv) and partial_lse (batch*head, split, Nq).
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  int num_splits = 1;
  int keys_per_split = 0;

  int batch = 0, heads = 0, num_queries = 0, num_keys = 0, head_dim_qk = 0, head_dim_v = 0;
  float scale = 1.0f;
  // Causal masking (see above): a row that sees no key gives 0 (+ residual), lse = -inf.
  bool causal = false;
};

// The head dims that serve (head_dim_qk, head_dim_v): the cheapest compiled pair that
// holds both, else the wide kernels' rounded dims when both are at most
// config::kWideMaxHeadDim, else {0, 0}.
HeadDims select_head_dims(int head_dim_qk, int head_dim_v);

// Every compiled pair, in order of cost (the wide kernels are not among them).
std::vector<HeadDims> compiled_head_dims();

// Throws std::invalid_argument saying what is wrong with `params` (sizes, head dims,
// splits, missing buffers); touches no GPU. The binding calls it once per call, before
// anything reaches the GPU.
void check_forward_params(const ForwardParams& params);

// Runs the forward (and the merge when split) on `stream`, for params that passed
// check_forward_params. Throws std::invalid_argument when the GPU cannot hold the plan
// and std::runtime_error for CUDA errors.
void run_forward(const ForwardParams& params, cudaStream_t stream);

// Combines the split partials into out and lse (the residual is added here).
void merge_splits(const ForwardParams& params, cudaStream_t stream);

}  // namespace pk
