"""Simulator backend: gpurnn's CUDA kernels, unchanged, on NumPy arrays (GEMMs by NumPy). For CI
without a GPU; slow (a Python thread per CUDA thread), so keep sizes and threads small.

Two simulators, chosen by backend_options={"simulator": ...}:
  "strict" (default)  gpurnn.sim: every thread of every block concurrently, a real grid barrier,
                      race/barrier/bounds checks; the persistent kernels run with P blocks in
                      ONE launch over all steps, exactly as on a GPU. Any finding fails the call.
                      Re-entrant: calls from several host threads run independently.
  "stock"             Numba's own simulator (NUMBA_ENABLE_CUDASIM=1 before numba.cuda is first
                      imported; gpurnn sets it when it still can). It runs blocks one after
                      another and its grid.sync() is only a block barrier, so with P > 1 the host
                      launches one step (backward: one phase) at a time, the launch boundary
                      acting as the grid barrier. It is not re-entrant: its launches are
                      serialised by a lock.
The host side of the algorithm is the CUDA backend's (cuda.run_forward / run_backward, and for
the LSTM family of gpurnn.variants cuda.run_lstm_forward / run_lstm_backward, for the
LayerNormLSTM gpurnn.backends.cuda_layernorm), regularisers (forward's noise=) included.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading

import numpy as np

from . import cuda as _host

NAME = "sim"
SIMULATORS = ("strict", "stock")
_SIM_ENV = "NUMBA_ENABLE_CUDASIM"
_STOCK_LOCK = threading.Lock()


def _require_numba_cuda():
    if importlib.util.find_spec("numba_cuda") is None:
        # numba's own deprecated numba.cuda lacks what the kernels use
        raise ImportError("the 'sim' backend needs the numba-cuda package, which is not "
                          "installed: pip install 'gpurnn[sim]'")


_require_numba_cuda()


def enable_stock_simulator():
    """Put numba.cuda in simulator mode for this process, or say why it is too late."""
    # numba.cuda reads the variable once, when it is first imported; after that the process is
    # committed to hardware or simulator mode.
    if "numba.cuda" not in sys.modules:
        os.environ[_SIM_ENV] = "1"
        return
    from numba.cuda.core import config
    if not config.ENABLE_CUDASIM:
        raise RuntimeError(
            "backend_options simulator='stock' needs Numba's CUDA simulator, but numba.cuda was "
            "already imported in hardware mode in this process (it reads NUMBA_ENABLE_CUDASIM "
            "only at its first import); set NUMBA_ENABLE_CUDASIM=1 in the environment, or use "
            "the default strict simulator, which works in either mode")


class SimRuntime(_host.Runtime):
    """The strict simulator: kernels become gpurnn.sim.StrictKernels."""
    name = NAME
    device = "sim"
    per_step_grid = False

    def __init__(self):
        super().__init__()
        self.launch_hook = None   # callable(info: dict), called before every launch

    @property
    def xp(self):
        return np

    def compile(self, spec):
        from .. import sim
        sim.check_numba_cuda()
        return sim.jit(spec.func, name=spec.name)

    def stream(self):
        return 0            # launches are synchronous

    def on_launch(self, info):
        hook = RUNTIME.launch_hook
        if hook is not None:
            hook(dict(info, simulator=self.simulator))

    simulator = "strict"


class StockSimRuntime(SimRuntime):
    """Numba's own simulator, one launch per step when P > 1 (see the module docstring)."""
    per_step_grid = True
    simulator = "stock"

    def compile(self, spec):
        enable_stock_simulator()
        from numba import cuda
        return cuda.jit(spec.func)


RUNTIME = SimRuntime()
STOCK_RUNTIME = StockSimRuntime()


reserve_dtypes = _host.reserve_dtypes


def check_options(options):
    """The cuda backend's launch options plus 'simulator' ('strict' or 'stock')."""
    options = _host.check_options(options, NAME, extra=("simulator",))
    choice = options.get("simulator", "strict")
    if choice not in SIMULATORS:
        raise ValueError(f"backend_options['simulator'] must be one of {SIMULATORS}; got {choice!r}")
    return options


def _split(options):
    """(runtime, the options left for the launch) from backend_options."""
    options = check_options(options)
    if "simulator" not in options:
        return RUNTIME, options
    rest = {k: v for k, v in options.items() if k != "simulator"}
    return (RUNTIME if options["simulator"] == "strict" else STOCK_RUNTIME), rest


def forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, *,
            options=None, noise=None):
    rt, options = _split(options)
    args = (rt, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, options,
            noise)
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return _host.run_forward(*args)
    return _host.run_forward(*args)


def backward(reserve, dy, dh_n, dc_n, *, options=None):
    rt, options = _split(options)
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return _host.run_backward(rt, reserve, dy, dh_n, dc_n, options)
    return _host.run_backward(rt, reserve, dy, dh_n, dc_n, options)


def lstm_forward(form, x, params, h0, c0, lengths, reverse, need_saved, *, options=None):
    """The LSTM family's forward (gpurnn.variants) on the simulator chosen by options."""
    rt, options = _split(options)
    args = (rt, form, x, params, h0, c0, lengths, reverse, need_saved, options)
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return _host.run_lstm_forward(*args)
    return _host.run_lstm_forward(*args)


def lstm_backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, options=None):
    """The LSTM family's backward (gpurnn.variants) on the simulator chosen by options."""
    rt, options = _split(options)
    args = (rt, form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, options)
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return _host.run_lstm_backward(*args)
    return _host.run_lstm_backward(*args)


def layernorm_forward(x, params, h0, c0, lengths, reverse, need_saved, *, noise=None,
                      options=None):
    """The LayerNormLSTM's forward (gpurnn.layernorm) on the simulator chosen by options; its
    host code is gpurnn.backends.cuda_layernorm (imported lazily)."""
    from . import cuda_layernorm
    rt, options = _split(options)
    args = (rt, x, params, h0, c0, lengths, reverse, need_saved, noise, options)
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return cuda_layernorm.run_forward(*args)
    return cuda_layernorm.run_forward(*args)


def layernorm_backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, noise=None,
                       options=None):
    """The LayerNormLSTM's backward (gpurnn.layernorm) on the simulator chosen by options."""
    from . import cuda_layernorm
    rt, options = _split(options)
    args = (rt, x, params, saved, lengths, reverse, dy, dh_n, dc_n, noise, options)
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return cuda_layernorm.run_backward(*args)
    return cuda_layernorm.run_backward(*args)


# ---- whole stacks: the layer wavefront and the gated-feedback cells -------------------------
def _on(rt, fn, *args):
    """fn(rt, *args) on the chosen simulator (the stock one serialised by its lock)."""
    if rt is STOCK_RUNTIME:
        enable_stock_simulator()
        with _STOCK_LOCK:
            return fn(rt, *args)
    return fn(rt, *args)


def use_wavefront(cell, input_size, hidden, batch, layers, steps, dtype, options):
    """cuda.use_wavefront in the simulator: only where backend_options ask for it."""
    _, rest = _split(options)
    return _host.use_wavefront(cell, input_size, hidden, batch, layers, steps, dtype, rest,
                               device="sim")


def stack_forward(cell, x, layers, h0, c0, lengths, need_saved, *, options=None):
    rt, options = _split(options)
    return _on(rt, _host.wavefront_modules(cell)[0].run_stack_forward, cell, x, layers, h0, c0,
               lengths, need_saved, _host._stack_options(options))


def stack_backward(cell, x, layers, saved, lengths, dy, dh_n, dc_n, *, options=None):
    rt, options = _split(options)
    return _on(rt, _host.wavefront_modules(cell)[0].run_stack_backward, cell, x, layers, saved,
               lengths, dy, dh_n, dc_n, _host._stack_options(options))


def feedback_forward(cell, x, params, h0, c0, lengths, masks, need_saved, *, options=None):
    from . import cuda_feedback
    rt, options = _split(options)
    return _on(rt, cuda_feedback.run_forward, cell, x, params, h0, c0, lengths, masks,
               need_saved, _host._stack_options(options))


def feedback_backward(cell, x, params, saved, lengths, masks, dy, dh_n, dc_n, *, options=None):
    from . import cuda_feedback
    rt, options = _split(options)
    return _on(rt, cuda_feedback.run_backward, cell, x, params, saved, lengths, masks, dy, dh_n,
               dc_n, _host._stack_options(options))
