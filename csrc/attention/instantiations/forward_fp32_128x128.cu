// One instantiation per file, so the kernels compile in parallel.
#include "../forward_launchers.cuh"

PK_INSTANTIATE_SIMT_FORWARD(128, 128)
