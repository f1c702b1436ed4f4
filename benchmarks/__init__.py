"""The benchmark suite of perceiver-kernels (python -m benchmarks --help)."""
