// One instantiation per file, so the kernels compile in parallel.
#include "../forward_launchers.cuh"

PK_INSTANTIATE_WIDE_TENSOR_CORE_FORWARD(__half)
