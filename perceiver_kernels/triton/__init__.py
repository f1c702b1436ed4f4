"""The Triton kernels, their launchers, tiling and launch configs, and their backend."""
