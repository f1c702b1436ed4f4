// The one entry file of perceiver_kernels._C: the pybind11 module and its argument checks.
//
// The module deliberately avoids torch headers. Python hands it raw device pointers,
// sizes, strides and the current stream, so one binary works with any torch build.
// Every argument is checked here, before anything touches the GPU, and every error
// comes back as a Python exception that says what to fix: ValueError for arguments,
// RuntimeError for CUDA failures (no driver, no device, a failed launch).
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention/forward.h"
#include "attention/forward_config.h"

namespace py = pybind11;

namespace {

// Sizes become 32-bit integers (rows are indexed with them inside tile loops); this
// bound leaves room for the tile arithmetic past the last row.
constexpr int64_t kMaxRows = int64_t{1} << 30;

std::vector<std::pair<int, int>> compiled_head_dims() {
  std::vector<std::pair<int, int>> pairs;
  for (const pk::HeadDims& dims : pk::compiled_head_dims()) pairs.emplace_back(dims.qk, dims.v);
  return pairs;
}

std::optional<std::pair<int, int>> forward_head_dims(int head_dim_qk, int head_dim_v) {
  const pk::HeadDims dims = pk::select_head_dims(head_dim_qk, head_dim_v);
  if (dims.qk == 0) return std::nullopt;
  return std::make_pair(dims.qk, dims.v);
}

py::dict build_info() {
  py::dict info;
  info["cuda_version"] = PK_CUDA_VERSION;
  info["cuda_archs"] = PK_CUDA_ARCHS;
  info["build_type"] = PK_BUILD_TYPE;
  info["cudart_version"] = CUDART_VERSION;
  info["forward_head_dims"] = compiled_head_dims();
  // Dims beyond the compiled pairs: the wide kernels take any up to `max`, rounded up to
  // a multiple of `multiple`, and cut Dv into blocks of at most value_channels_per_block
  // (a split plan that counts blocks multiplies by cdiv(Dv, that)).
  py::dict wide_value_channels;
  wide_value_channels["float32"] = pk::config::kWideSimtBlockChannels;
  wide_value_channels["float16"] = pk::config::kWideBlockChannels;
  wide_value_channels["bfloat16"] = pk::config::kWideBlockChannels;
  py::dict wide;
  wide["multiple"] = pk::config::kWideHeadDimMultiple;
  wide["max"] = pk::config::kWideMaxHeadDim;
  wide["value_channels_per_block"] = wide_value_channels;
  info["forward_wide_head_dims"] = wide;
  // What the Python launcher plans with: query rows per block of each dtype's kernel
  // (the split plan counts blocks) and the grid's batch * heads limit.
  py::dict query_tile_rows;
  query_tile_rows["float32"] = pk::config::kSimtBlockM;
  query_tile_rows["float16"] = pk::config::kTensorCoreBlockM;
  query_tile_rows["bfloat16"] = pk::config::kTensorCoreBlockM;
  info["query_tile_rows"] = query_tile_rows;
  info["max_batch_heads"] = pk::config::kMaxBatchHeads;
  info["max_rows"] = kMaxRows;
  return info;
}

// Version of the installed driver, 0 when none is installed.
int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

// Number of visible GPUs. "No device" is an answer (0); any other failure (no
// driver, a driver older than this runtime) is raised with CUDA's own words so
// the backend can tell the user why it cannot run.
int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorNoDevice) {
    cudaGetLastError();
    return 0;
  }
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
  return count;
}

pk::DType parse_dtype(const std::string& dtype) {
  if (dtype == "float32") return pk::DType::kFloat32;
  if (dtype == "float16") return pk::DType::kFloat16;
  if (dtype == "bfloat16") return pk::DType::kBFloat16;
  throw py::value_error("dtype must be 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
}

template <size_t N>
void copy_strides(int64_t (&target)[N], const std::vector<int64_t>& strides, const char* name) {
  if (strides.size() != N) {
    throw py::value_error(std::string(name) + " must hold " + std::to_string(N) + " element strides, got " +
                          std::to_string(strides.size()));
  }
  for (size_t i = 0; i < N; ++i) target[i] = strides[i];
}

void check_range(int64_t value, int64_t low, int64_t high, const char* name) {
  if (value < low || value > high) {
    throw py::value_error(std::string(name) + " must be in [" + std::to_string(low) + ", " + std::to_string(high) +
                          "], got " + std::to_string(value));
  }
}

// The pointer must be device memory of `device`: a host pointer handed to a kernel
// would crash the process instead of raising.
void check_device_pointer(uintptr_t pointer, const char* name, int device) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, reinterpret_cast<const void*>(pointer));
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(std::string(name) + " is not CUDA memory (" + cudaGetErrorString(status) + ")");
  }
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    throw py::value_error(std::string(name) + " points to host memory; the CUDA kernels need CUDA tensors");
  }
  if (attributes.device != device) {
    throw py::value_error(std::string(name) + " is on cuda:" + std::to_string(attributes.device) +
                          ", the call runs on cuda:" + std::to_string(device));
  }
}

void forward(const std::string& dtype, int64_t device, uintptr_t stream, uintptr_t q, const std::vector<int64_t>& q_stride,
             uintptr_t k, const std::vector<int64_t>& k_stride, uintptr_t v, const std::vector<int64_t>& v_stride,
             uintptr_t key_padding, const std::vector<int64_t>& key_padding_stride, uintptr_t residual,
             const std::vector<int64_t>& residual_stride, uintptr_t out, const std::vector<int64_t>& out_stride,
             uintptr_t lse, uintptr_t partial_out, uintptr_t partial_lse, int64_t batch, int64_t heads,
             int64_t num_queries, int64_t num_keys, int64_t head_dim_qk, int64_t head_dim_v, double scale,
             int64_t num_splits, int64_t keys_per_split, bool causal) {
  pk::ForwardParams p;
  p.dtype = parse_dtype(dtype);
  // Ranges that make the int conversions below exact; what the kernels support is
  // checked by pk::check_forward_params.
  const std::pair<int64_t, const char*> sizes[] = {
      {batch, "batch"},         {heads, "heads"},           {num_queries, "num_queries"},
      {num_keys, "num_keys"},   {head_dim_qk, "head_dim_qk"}, {head_dim_v, "head_dim_v"},
      {num_splits, "num_splits"}, {keys_per_split, "keys_per_split"}};
  for (const auto& [value, name] : sizes) check_range(value, 1, kMaxRows, name);
  check_range(device, 0, std::numeric_limits<int>::max(), "device");
  if (!std::isfinite(static_cast<float>(scale))) throw py::value_error("scale must be finite in float32");
  copy_strides(p.q_stride, q_stride, "q_stride");
  copy_strides(p.k_stride, k_stride, "k_stride");
  copy_strides(p.v_stride, v_stride, "v_stride");
  copy_strides(p.out_stride, out_stride, "out_stride");
  if (key_padding != 0) copy_strides(p.key_padding_stride, key_padding_stride, "key_padding_stride");
  if (residual != 0) copy_strides(p.residual_stride, residual_stride, "residual_stride");
  p.device = static_cast<int>(device);
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.key_padding = reinterpret_cast<const uint8_t*>(key_padding);
  p.residual = reinterpret_cast<const void*>(residual);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.partial_out = reinterpret_cast<float*>(partial_out);
  p.partial_lse = reinterpret_cast<float*>(partial_lse);
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.num_queries = static_cast<int>(num_queries);
  p.num_keys = static_cast<int>(num_keys);
  p.head_dim_qk = static_cast<int>(head_dim_qk);
  p.head_dim_v = static_cast<int>(head_dim_v);
  p.scale = static_cast<float>(scale);
  p.num_splits = static_cast<int>(num_splits);
  p.keys_per_split = static_cast<int>(keys_per_split);
  p.causal = causal;
  pk::check_forward_params(p);

  const int count = device_count();
  if (count == 0) throw std::runtime_error("no CUDA device is visible; the CUDA kernels need a GPU");
  if (device >= count) {
    throw py::value_error("device must be below the " + std::to_string(count) + " visible CUDA devices, got " +
                          std::to_string(device));
  }
  const std::pair<uintptr_t, const char*> pointers[] = {
      {q, "q"},     {k, "k"},     {v, "v"},           {key_padding, "key_padding"},
      {residual, "residual"}, {out, "out"}, {lse, "lse"}, {partial_out, "partial_out"},
      {partial_lse, "partial_lse"}};
  for (const auto& [pointer, name] : pointers) {
    if (pointer != 0) check_device_pointer(pointer, name, static_cast<int>(device));
  }
  pk::run_forward(p, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "perceiver_kernels CUDA extension (torch-independent)";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA version, architectures, build type, compiled head dims\n"
        "and the wide kernels' range.");
  m.def("driver_version", &driver_version, "CUDA driver version as an integer (e.g. 13000), 0 without a driver.");
  m.def("device_count", &device_count,
        "Number of CUDA devices; raises RuntimeError when the driver is missing or too old.");
  m.def("forward_head_dims", &forward_head_dims, py::arg("head_dim_qk"), py::arg("head_dim_v"),
        "The (Dqk, Dv) that serve these head dims: the cheapest compiled pair that holds them, else the\n"
        "wide kernels' dims rounded up to a multiple of 16 (up to build_info()['forward_wide_head_dims']['max']),\n"
        "else None.");
  m.def("forward", &forward,
        "Fused cross-attention forward on raw device pointers (see perceiver_kernels/cuda_launch.py).\n"
        "Strides are in elements, in (batch, head, row, channel) order; key_padding is a (batch, key)\n"
        "byte mask (nonzero = padding) or 0; residual may be 0; lse is (batch*heads, Nq) fp32;\n"
        "with num_splits > 1, partial_out (batch*heads, splits, Nq, Dv) and partial_lse\n"
        "(batch*heads, splits, Nq) are contiguous fp32 buffers. causal: query i sees key j only if\n"
        "j <= i + num_keys - num_queries.",
        py::kw_only(), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("q"), py::arg("q_stride"),
        py::arg("k"), py::arg("k_stride"), py::arg("v"), py::arg("v_stride"), py::arg("key_padding"),
        py::arg("key_padding_stride"), py::arg("residual"), py::arg("residual_stride"), py::arg("out"),
        py::arg("out_stride"), py::arg("lse"), py::arg("partial_out"), py::arg("partial_lse"), py::arg("batch"),
        py::arg("heads"), py::arg("num_queries"), py::arg("num_keys"), py::arg("head_dim_qk"),
        py::arg("head_dim_v"), py::arg("scale"), py::arg("num_splits"), py::arg("keys_per_split"),
        // A bool only: without noconvert pybind11 would take any object with __bool__ (1, "no").
        py::arg("causal").noconvert() = false);
}
