"""gpurnn's strict CUDA simulator: the launch a GPU runs, run faithfully on the CPU, with checks.

    from gpurnn import sim
    k = sim.jit(my_kernel)                 # a Python function or a numba.cuda.jit dispatcher
    report = k[blocks, threads, 0, shared_bytes](*numpy_arrays_and_scalars)
    report.findings, report.traffic["w"].reads

What it does, per launch:
  * every thread of every block runs concurrently (one Python thread each, one at a time by a
    baton: reproducible), `cuda.syncthreads()` is a barrier of the block and the cooperative
    grid barrier (`cuda.cg.this_grid().sync()`, or numba's `_grid_group_sync` intrinsic) a
    barrier of the whole grid;
  * barrier errors instead of hangs or silent passes: divergent barriers in a block, a block
    barrier some threads never reach because they exited, a grid barrier after any thread
    exited ("a GPU would hang here"), deadlock — each a BarrierError naming kernel, block,
    thread and source line;
  * race detection on global, shared and local arrays by barrier epochs (a warp is not assumed
    to run in lockstep; atomic/atomic pairs are not races), both accesses reported;
  * memory faults: per-block shared memory poisoned (NaN), reads of never-written shared or
    local memory reported, negative or past-the-end indices raise MemoryFault;
  * a traffic record: per kernel argument, how often each element was loaded and stored.
Races and uninitialised reads are findings: the launch runs to its end and then raises
SimulatorFindings (its `.report` lists them), or returns them with `raise_on_findings=False`.
Everything else stops the launch at once with a SimulatorError subclass.

What it does not model: the memory model (stores are visible at once; fences are no-ops, so a
missing fence is not found), warp intrinsics (shuffles, votes, `activemask`: NotModelled),
residency limits and timing (any grid up to MAX_THREADS threads runs), integer overflow,
compiled numerics beyond dtype (float32 math stays float32, but FMA contraction and `fastmath`
are not reproduced), array slicing/views inside kernels, and device functions reached through
a module attribute (`mod.fn(...)`) rather than a global or closure name.

It works whatever mode numba.cuda is in (hardware or Numba's own simulator): kernels are read
as Python source and rebuilt per launch with a simulated `cuda`, nothing is patched in place,
so launches from several host threads are independent.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

from .executor import MAX_THREADS, Launch, wrap_args
from .fakecuda import kernel_source
from .report import (BarrierError, Finding, KernelError, LaunchReport, MemoryFault, NotModelled,
                     SimulatorError, SimulatorFindings, Traffic, WatchdogTimeout)

__all__ = ["jit", "launch", "record", "StrictKernel", "LaunchReport", "Finding", "Traffic",
           "SimulatorError", "SimulatorFindings", "BarrierError", "MemoryFault", "KernelError",
           "NotModelled", "WatchdogTimeout", "MAX_THREADS", "SUPPORTED_NUMBA_CUDA",
           "check_numba_cuda"]

# Device functions are recognised by their dispatcher class and read through `py_func`; the
# grid intrinsics by `numba.cuda.cg._this_grid` / `_grid_group_sync`. Checked on these versions.
SUPPORTED_NUMBA_CUDA = ((0, 30),)

_recorders = threading.local()


@functools.lru_cache(maxsize=None)
def check_numba_cuda():
    """Raise RuntimeError unless the installed numba-cuda is one this simulator was checked on."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("numba-cuda")
    except PackageNotFoundError:
        raise RuntimeError("gpurnn's strict simulator needs numba-cuda (pip install 'gpurnn[sim]')")
    major_minor = tuple(int(p) for p in v.split(".")[:2])
    if major_minor not in SUPPORTED_NUMBA_CUDA:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_NUMBA_CUDA)
        raise RuntimeError(f"gpurnn's strict simulator was checked on numba-cuda {supported}; "
                           f"numba-cuda {v} is installed (it reads dispatchers' py_func and "
                           f"numba.cuda.cg's grid intrinsics): install numba-cuda==0.30.*")


@contextmanager
def record():
    """Collect the LaunchReport of every strict launch made on this host thread inside."""
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    reports = []
    stack.append(reports)
    try:
        yield reports
    finally:
        stack.remove(reports)


def launch(kernel, grid, block, args, *, shared_bytes=0, raise_on_findings=True, name=None,
           watchdog=None) -> LaunchReport:
    """Run `kernel` (a Python function or numba.cuda.jit dispatcher) on `grid` x `block`
    threads with `shared_bytes` of dynamic shared memory per block, on NumPy arrays (written in
    place, as device memory would be) and scalars. Returns the LaunchReport; raises
    SimulatorFindings if it raced or read uninitialised memory (unless raise_on_findings=False)
    and another SimulatorError if it had to stop."""
    from .executor import WATCHDOG_SECONDS
    check_numba_cuda()
    fn = kernel_source(kernel)
    name = name or fn.__name__
    run = Launch(fn, grid, block, shared_bytes, name,
                 WATCHDOG_SECONDS if watchdog is None else float(watchdog))
    params = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    if len(args) != len(params):
        raise TypeError(f"{name} takes {len(params)} arguments {params}; got {len(args)}")
    wrapped = wrap_args(run, params, args)
    seconds = run.run(wrapped)
    if run.error is not None:
        raise run.error
    report = LaunchReport(kernel=name, grid=tuple(run.grid_dim), block=tuple(run.block_dim),
                          shared_bytes=run.shared_bytes, findings=list(run.findings.values()),
                          traffic={p: a.traffic() for p, a in zip(params, wrapped)
                                   if hasattr(a, "traffic")},
                          block_barriers=run.block_barriers, grid_barriers=run.grid_barriers,
                          accesses=run.accesses, seconds=seconds)
    for reports in getattr(_recorders, "stack", None) or ():
        reports.append(report)
    if report.findings and raise_on_findings:
        raise SimulatorFindings(report)
    return report


class StrictKernel:
    """A kernel for the strict simulator, launched like a Numba one: k[grid, block, stream,
    shared_bytes](*args) (stream ignored: launches are synchronous). Returns the LaunchReport."""

    def __init__(self, kernel, *, name=None, raise_on_findings=True):
        self.py_func = kernel_source(kernel)
        self.name = name or self.py_func.__name__
        self.raise_on_findings = raise_on_findings

    def __getitem__(self, config):
        if not isinstance(config, tuple) or not 2 <= len(config) <= 4:
            raise ValueError(f"launch configuration must be [grid, block(, stream(, shared_bytes))]; "
                             f"got {config!r}")
        grid, block = config[0], config[1]
        shared = config[3] if len(config) == 4 else 0

        def configured(*args):
            return launch(self.py_func, grid, block, args, shared_bytes=shared,
                          raise_on_findings=self.raise_on_findings, name=self.name)
        return configured

    def __repr__(self):
        return f"<gpurnn.sim.StrictKernel {self.name}>"


def jit(kernel=None, **options):
    """Decorator or call: a StrictKernel for a Python kernel function or a numba.cuda.jit
    dispatcher (options: name, raise_on_findings)."""
    if kernel is None:
        return lambda k: StrictKernel(k, **options)
    return StrictKernel(kernel, **options)
