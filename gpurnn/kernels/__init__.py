"""Numba CUDA kernels only: persistent forward/backward per cell, stepwise pointwise kernels,
device math helpers, launch + shared-memory opt-in, compile cache. No allocation, no validation."""
