// One instantiation per file, so the kernels compile in parallel.
#include "../forward_launchers.cuh"

PK_INSTANTIATE_WIDE_SIMT_FORWARD(pk::config::kWideSimtLaneChannels)
