"""The CPU fast path behind backend 'cpu' (gpurnn/backends/cpu.py): Numba kernels that run a
whole layer and direction on an OpenMP team, with the BLAS the process already has.

    native    calling C from Numba; finding MKL (torch's), OpenBLAS (NumPy's) and libgomp
    kernels   the forward and backward workers, fused per-step cell math, trampolines

Needs Numba (a dependency of gpurnn). The NumPy backend stays the readable reference that this
path is tested against.
"""
