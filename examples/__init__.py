"""Training examples: Perceiver IO models from this package learning real tasks, offline."""
