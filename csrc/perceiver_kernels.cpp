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
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention/forward.h"

namespace py = pybind11;

namespace {

// Rows are indexed with 32-bit integers inside a tile loop; this bound leaves room
// for the tile arithmetic past the last row.
constexpr int64_t kMaxRows = int64_t{1} << 30;

std::string compiled_pairs_text() {
  std::string text;
  for (const pk::HeadDims& dims : pk::compiled_head_dims()) {
    if (!text.empty()) text += ", ";
    text += std::to_string(dims.qk) + "/" + std::to_string(dims.v);
  }
  return text;
}

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
  info["attention_kernels"] = true;
  info["forward_head_dims"] = compiled_head_dims();
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

void forward(const std::string& dtype, int device, uintptr_t stream, uintptr_t q, const std::vector<int64_t>& q_stride,
             uintptr_t k, const std::vector<int64_t>& k_stride, uintptr_t v, const std::vector<int64_t>& v_stride,
             uintptr_t key_padding, const std::vector<int64_t>& key_padding_stride, uintptr_t residual,
             const std::vector<int64_t>& residual_stride, uintptr_t out, const std::vector<int64_t>& out_stride,
             uintptr_t lse, uintptr_t partial_out, uintptr_t partial_lse, int64_t batch, int64_t heads,
             int64_t num_queries, int64_t num_keys, int64_t head_dim_qk, int64_t head_dim_v, double scale,
             int64_t num_splits, int64_t keys_per_split) {
  pk::ForwardParams p;
  p.dtype = parse_dtype(dtype);
  check_range(batch, 1, 65535, "batch");
  check_range(heads, 1, 65535, "heads");
  check_range(batch * heads, 1, 65535, "batch * heads");
  check_range(num_queries, 1, kMaxRows, "num_queries");
  check_range(num_keys, 1, kMaxRows, "num_keys");
  check_range(head_dim_qk, 1, 1 << 16, "head_dim_qk");
  check_range(head_dim_v, 1, 1 << 16, "head_dim_v");
  if (pk::select_head_dims(static_cast<int>(head_dim_qk), static_cast<int>(head_dim_v)).qk == 0) {
    throw py::value_error("no compiled kernel serves head dims Dqk=" + std::to_string(head_dim_qk) +
                          " Dv=" + std::to_string(head_dim_v) + "; compiled Dqk/Dv pairs (smaller dims are padded up): " +
                          compiled_pairs_text());
  }
  check_range(num_splits, 1, 65535, "num_splits");
  check_range(keys_per_split, 1, kMaxRows, "keys_per_split");
  if (num_splits * keys_per_split < num_keys || (num_splits - 1) * keys_per_split >= num_keys) {
    throw py::value_error("num_splits chunks of keys_per_split keys must cover num_keys=" + std::to_string(num_keys) +
                          ", each starting inside it; got " + std::to_string(num_splits) + " * " +
                          std::to_string(keys_per_split));
  }
  if (!std::isfinite(static_cast<float>(scale))) throw py::value_error("scale must be finite in float32");
  copy_strides(p.q_stride, q_stride, "q_stride");
  copy_strides(p.k_stride, k_stride, "k_stride");
  copy_strides(p.v_stride, v_stride, "v_stride");
  copy_strides(p.out_stride, out_stride, "out_stride");
  if (key_padding != 0) copy_strides(p.key_padding_stride, key_padding_stride, "key_padding_stride");
  if (residual != 0) copy_strides(p.residual_stride, residual_stride, "residual_stride");
  const std::pair<uintptr_t, const char*> required[] = {{q, "q"}, {k, "k"}, {v, "v"}, {out, "out"}, {lse, "lse"}};
  for (const auto& [pointer, name] : required) {
    if (pointer == 0) throw py::value_error(std::string(name) + " is a null pointer");
  }
  if (num_splits > 1 && (partial_out == 0 || partial_lse == 0)) {
    throw py::value_error("num_splits > 1 needs partial_out and partial_lse buffers");
  }

  const int count = device_count();
  if (count == 0) throw std::runtime_error("no CUDA device is visible; the CUDA kernels need a GPU");
  check_range(device, 0, count - 1, "device");
  const std::pair<uintptr_t, const char*> pointers[] = {
      {q, "q"},     {k, "k"},     {v, "v"},           {key_padding, "key_padding"},
      {residual, "residual"}, {out, "out"}, {lse, "lse"}, {partial_out, "partial_out"},
      {partial_lse, "partial_lse"}};
  for (const auto& [pointer, name] : pointers) {
    if (pointer != 0) check_device_pointer(pointer, name, device);
  }

  p.device = device;
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
  pk::run_forward(p, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "perceiver_kernels CUDA extension (torch-independent)";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA version, architectures, build type, compiled head dims.");
  m.def("driver_version", &driver_version, "CUDA driver version as an integer (e.g. 13000), 0 without a driver.");
  m.def("device_count", &device_count,
        "Number of CUDA devices; raises RuntimeError when the driver is missing or too old.");
  m.def("forward_head_dims", &forward_head_dims, py::arg("head_dim_qk"), py::arg("head_dim_v"),
        "The compiled (Dqk, Dv) pair that serves these head dims, or None.");
  m.def("forward", &forward,
        "Fused cross-attention forward on raw device pointers (see perceiver_kernels/cuda_launch.py).\n"
        "Strides are in elements, in (batch, head, row, channel) order; key_padding is a (batch, key)\n"
        "byte mask (nonzero = padding) or 0; residual may be 0; lse is (batch*heads, Nq) fp32;\n"
        "with num_splits > 1, partial_out (batch*heads, splits, Nq, Dv) and partial_lse\n"
        "(batch*heads, splits, Nq) are contiguous fp32 buffers.",
        py::kw_only(), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("q"), py::arg("q_stride"),
        py::arg("k"), py::arg("k_stride"), py::arg("v"), py::arg("v_stride"), py::arg("key_padding"),
        py::arg("key_padding_stride"), py::arg("residual"), py::arg("residual_stride"), py::arg("out"),
        py::arg("out_stride"), py::arg("lse"), py::arg("partial_out"), py::arg("partial_lse"), py::arg("batch"),
        py::arg("heads"), py::arg("num_queries"), py::arg("num_keys"), py::arg("head_dim_qk"),
        py::arg("head_dim_v"), py::arg("scale"), py::arg("num_splits"), py::arg("keys_per_split"));
}
