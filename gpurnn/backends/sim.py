"""Simulator backend: gpurnn's CUDA kernels, unchanged, in Numba's CUDA simulator on NumPy arrays
(GEMMs by NumPy). For CI without a GPU; slow (a Python thread per CUDA thread), so keep sizes
and threads per block small.

The simulator runs a grid's blocks one after another and its grid.sync() is only a block
barrier, so a multi-block persistent launch would be silently wrong. With P > 1 blocks the
host therefore launches one step (backward: one phase) at a time, the launch boundary acting as
the grid barrier; with P = 1 a single cooperative launch covers every step, as on a GPU.
The host side of the algorithm is the CUDA backend's (cuda.run_forward / run_backward).
"""
from __future__ import annotations

import os
import sys

_SIM_ENV = "NUMBA_ENABLE_CUDASIM"


def _enable_simulator():
    import importlib.util
    if importlib.util.find_spec("numba_cuda") is None:
        # numba's own deprecated numba.cuda lacks what the kernels use
        raise ImportError("the 'sim' backend needs the numba-cuda package, which is not "
                          "installed: pip install 'gpurnn[sim]'")
    # numba.cuda reads the variable once, when it is first imported; after that the process is
    # committed to hardware or simulator mode.
    if "numba.cuda" not in sys.modules:
        os.environ[_SIM_ENV] = "1"
        return
    from numba.cuda.core import config
    if not config.ENABLE_CUDASIM:
        raise RuntimeError(
            "the 'sim' backend needs Numba's CUDA simulator, but numba.cuda was already imported "
            "in hardware mode in this process (it reads NUMBA_ENABLE_CUDASIM only at its first "
            "import); set NUMBA_ENABLE_CUDASIM=1 in the environment, or use backend='sim' before "
            "anything imports numba.cuda")


_enable_simulator()

import numpy as np  # noqa: E402

from . import cuda as _host  # noqa: E402

NAME = "sim"


class SimRuntime(_host.Runtime):
    name = NAME
    device = "sim"
    per_step_grid = True

    def __init__(self):
        super().__init__()
        self.launch_hook = None   # callable(info: dict), called before every launch

    @property
    def xp(self):
        return np

    def compile(self, spec):
        from numba import cuda
        return cuda.jit(spec.func)

    def stream(self):
        return 0            # the simulator has one, synchronous, stream

    def on_launch(self, info):
        if self.launch_hook is not None:
            self.launch_hook(info)


RUNTIME = SimRuntime()


def forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, *,
            options=None):
    return _host.run_forward(RUNTIME, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse,
                             need_reserve, options)


def backward(reserve, dy, dh_n, dc_n, *, options=None):
    return _host.run_backward(RUNTIME, reserve, dy, dh_n, dc_n, options)
