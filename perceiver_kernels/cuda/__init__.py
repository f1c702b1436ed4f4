"""The CUDA C++ kernels (csrc/ -> perceiver_kernels._C): the extension, its launcher, its backend."""
