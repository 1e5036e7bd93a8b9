"""Launching persistent kernels: the shared-memory opt-in and the cooperative-grid guard.

Shared memory above 48 KB per block needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set on
the compiled kernel; numba-cuda has no public call for it (numba-cuda issue 94). In
numba-cuda 0.30 a dispatcher's overload (`dispatcher.compile(sig)`, a `_Kernel`) reaches its
loaded code through `_codelibrary.get_cufunc()`, whose `.handle` is a context-free `CUkernel`
(cuda.core loads code as a library). The documented call for a CUkernel is
`cuKernelSetAttribute(attr, value, kernel, device)` (what numba-cuda uses for its own kernel
attributes); a plain `CUfunction` gets `cuFuncSetAttribute`. The driver module is injectable
(`DRIVER`, or `driver=`) so the exact call is unit-tested without a GPU.

numba-cuda launches a kernel cooperatively by itself when its code uses a grid group: the
`_this_grid` / `_grid_group_sync` intrinsics set `use_cooperative` on the code library
(numba/cuda/cg.py), which becomes `_Kernel.cooperative` and the launch config's
`is_cooperative` (numba/cuda/dispatcher.py, `_Kernel.launch`). What it does not do is refuse a
grid too large to be co-resident; `launch_persistent` does, before launching.

In gpurnn's strict simulator (gpurnn.sim) kernels are `StrictKernel`s: every block runs at once
and the grid barrier is real, so any persistent launch runs as on a GPU; there is no driver,
so the opt-in is a no-op. In Numba's stock simulator (NUMBA_ENABLE_CUDASIM=1) kernels are
`FakeCUDAKernel`s: it runs blocks one after another and its grid.sync() only synchronises a
block, so a multi-block persistent launch is correct only when it covers a single step
(`single_step=True`).
"""
from __future__ import annotations

# The driver module used when none is passed; tests replace it with a fake. None means
# cuda.bindings.driver, imported on first use.
DRIVER = None

_DEFAULT_DYNAMIC_SMEM_LIMIT = 48 * 1024
# (function handle, opted-in bytes): cuFuncSetAttribute may synchronise the runtime, so each
# function is opted in once per size it grows to.
_opted_in: dict = {}


def _driver(driver=None):
    if driver is not None:
        return driver
    if DRIVER is not None:
        return DRIVER
    from cuda.bindings import driver as cuda_driver
    return cuda_driver


def is_simulator_kernel(kernel) -> bool:
    """True for kernels of Numba's CUDA simulator (which has no driver to talk to)."""
    return type(kernel).__module__.startswith("numba.cuda.simulator")


def is_strict_kernel(kernel) -> bool:
    """True for kernels of gpurnn's strict simulator (gpurnn.sim.StrictKernel)."""
    return type(kernel).__module__ == "gpurnn.sim"


def _check(driver, result, call):
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"{call} failed with {name} ({int(err)})")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def compiled_kernel(kernel, signature=None, args=None):
    """The compiled overload (numba-cuda `_Kernel`) of a dispatcher: for `signature`, else for
    the types of `args`, else its only overload. Objects that are already compiled (with a
    `_codelibrary`) pass through."""
    if hasattr(kernel, "_codelibrary"):
        return kernel
    if not hasattr(kernel, "overloads"):
        raise TypeError(f"kernel must be a numba.cuda.jit dispatcher or one of its compiled "
                        f"overloads; got {type(kernel).__name__}")
    if signature is not None:
        return kernel.compile(signature)
    if args is not None:
        return kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    if len(kernel.overloads) == 1:
        return next(iter(kernel.overloads.values()))
    raise ValueError(f"kernel has {len(kernel.overloads)} compiled overloads; pass signature= "
                     f"or args= to pick one")


def function_handle(kernel, signature=None, args=None, driver=None):
    """The driver handle of `kernel` (dispatcher, compiled overload, or numba-cuda function
    wrapper with a `.handle`): a context-free CUkernel where numba-cuda loaded the code as a
    library (0.30), else the CUfunction."""
    if hasattr(kernel, "handle") and not hasattr(kernel, "_codelibrary"):
        return kernel.handle
    return compiled_kernel(kernel, signature, args)._codelibrary.get_cufunc().handle


def set_max_dynamic_shared_memory(kernel, nbytes, *, signature=None, args=None, driver=None):
    """Let `kernel` launch with up to `nbytes` of dynamic shared memory per block
    (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES). A library kernel (CUkernel) takes the
    documented context-free call, cuKernelSetAttribute(attr, nbytes, kernel, device), as
    numba-cuda itself sets its kernels' attributes; a plain CUfunction takes cuFuncSetAttribute.
    Raises RuntimeError naming the driver's error if it refuses (e.g. nbytes plus the kernel's
    static shared memory above the device's opt-in limit). A no-op for simulator kernels."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int; got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0; got {nbytes}")
    if is_simulator_kernel(kernel) or is_strict_kernel(kernel):
        return  # a simulator allocates any size it is asked for: nothing to opt into
    d = _driver(driver)
    handle = function_handle(kernel, signature, args, driver=d)
    attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    if isinstance(handle, d.CUkernel):
        dev = _check(d, d.cuCtxGetDevice(), "cuCtxGetDevice")
        _check(d, d.cuKernelSetAttribute(attr, nbytes, handle, dev),
               f"cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, {nbytes})")
    else:
        _check(d, d.cuFuncSetAttribute(handle, attr, nbytes),
               f"cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, {nbytes})")
    _opted_in[_key(handle)] = nbytes


def _key(func):
    try:
        return int(func)
    except TypeError:
        return id(func)


def _device_smem_optin(d):
    dev = _check(d, d.cuCtxGetDevice(), "cuCtxGetDevice")
    attr = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    return int(_check(d, d.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"))


def _launch_shape(launch, direction):
    if hasattr(launch, "path") and hasattr(launch, "smem_bytes_fwd"):
        if launch.path != "persistent":
            raise ValueError(f"launch is a plan for the {launch.path!r} path; launch_persistent "
                             f"needs path 'persistent'")
        if direction not in ("fwd", "bwd"):
            raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")
        smem = launch.smem_bytes_fwd if direction == "fwd" else launch.smem_bytes_bwd
        return launch.blocks, launch.threads, smem
    if not (isinstance(launch, tuple) and len(launch) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in launch)):
        raise TypeError(f"launch must be a gpurnn Plan or a tuple (blocks, threads, smem_bytes) "
                        f"of ints; got {launch!r}")
    blocks, threads, smem = launch
    if blocks < 1 or threads < 1 or smem < 0:
        raise ValueError(f"launch (blocks, threads, smem_bytes) must be positive (smem >= 0); "
                         f"got {launch}")
    return blocks, threads, smem


def launch_persistent(kernel, launch, stream, args, *, direction="fwd", signature=None,
                      single_step=False, driver=None):
    """Launch a persistent (grid-synchronising) kernel: `kernel[blocks, threads, stream,
    smem](*args)`, after checking that the grid can be co-resident and opting in to the
    shared memory it needs.

    launch: a Plan with path 'persistent' (its blocks, threads and smem_bytes_<direction>), or a
    tuple (blocks, threads, smem_bytes). single_step: this launch covers one step, so it does
    not rely on the grid barrier (the simulator's way to run P > 1 blocks).
    Raises RuntimeError, without launching, if the static plus dynamic shared memory exceeds
    the device's opt-in limit or the grid exceeds kernel.max_cooperative_grid_blocks.
    """
    blocks, threads, smem = _launch_shape(launch, direction)
    if threads % 32:
        raise ValueError(f"threads per block must be a multiple of 32 (the kernels' lane groups "
                         f"and scratch assume whole warps); got {threads}")
    if is_strict_kernel(kernel):
        kernel[blocks, threads, stream, smem](*args)
        return
    if is_simulator_kernel(kernel):
        if blocks > 1 and not single_step:
            raise RuntimeError(f"the simulator runs blocks one after another and its grid.sync() "
                               f"only synchronises a block, so a {blocks}-block persistent launch "
                               f"would be silently wrong; launch one step at a time "
                               f"(single_step=True) or use 1 block")
        kernel[blocks, threads, stream, smem](*args)
        return

    d = _driver(driver)
    compiled = compiled_kernel(kernel, signature, args)
    static = int(compiled.shared_mem_per_block)
    optin = _device_smem_optin(d)
    if static + smem > optin:
        raise RuntimeError(f"kernel needs {static:,} B static + {smem:,} B dynamic shared memory "
                           f"per block; the device allows {optin:,} B (opt-in limit)")
    if static + smem > _DEFAULT_DYNAMIC_SMEM_LIMIT:
        handle = function_handle(compiled, driver=d)
        if _opted_in.get(_key(handle), -1) < smem:
            set_max_dynamic_shared_memory(compiled, smem, driver=d)
    limit = compiled.max_cooperative_grid_blocks(threads, smem)
    if blocks > limit:
        raise RuntimeError(f"a cooperative grid of {blocks} blocks x {threads} threads with "
                           f"{smem:,} B dynamic shared memory cannot be co-resident: the device "
                           f"holds at most {limit} such blocks; plan with blocks <= {limit}")
    kernel[blocks, threads, stream, smem](*args)
