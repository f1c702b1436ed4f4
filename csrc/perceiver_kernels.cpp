// The one entry file of perceiver_kernels._C: the pybind11 module and its argument checks.
//
// The module deliberately avoids torch headers. Python hands it raw device pointers,
// sizes, strides and the current stream, so one binary works with any torch build.
// For now it reports how it was built and what the CUDA runtime can see; the
// attention kernels arrive with the CUDA backend.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["cuda_version"] = PK_CUDA_VERSION;
  info["cuda_archs"] = PK_CUDA_ARCHS;
  info["build_type"] = PK_BUILD_TYPE;
  info["cudart_version"] = CUDART_VERSION;
  info["attention_kernels"] = false;
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
  if (status == cudaErrorNoDevice) return 0;
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "perceiver_kernels CUDA extension (torch-independent)";
  m.def("build_info", &build_info, "How this extension was built: CUDA version, architectures, build type.");
  m.def("driver_version", &driver_version, "CUDA driver version as an integer (e.g. 13000), 0 without a driver.");
  m.def("device_count", &device_count, "Number of CUDA devices; raises RuntimeError when the driver is missing or too old.");
}
