"""Benchmarks of the kernels (append tidy CSV rows; separate plot scripts)."""
