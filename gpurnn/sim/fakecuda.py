"""The `cuda` a kernel sees under the strict simulator, and the translation that puts it there.

A kernel is plain Python source (a `numba.cuda.jit` dispatcher's `py_func`, a FakeCUDAKernel's
`py_func` in Numba's own simulator mode, or an undecorated function). For each launch it is
rebuilt with a copy of its globals in which `numba.cuda` is a FakeCuda bound to that launch,
`math` keeps float32 as float32 (compiled `math.tanh(float32)` is `tanhf`), the
cooperative-groups intrinsics are the launch's grid barrier, and every device function it
reaches (through globals or closure cells) is rebuilt the same way. Nothing is patched in
place, so launches on several host threads, and Numba's own simulator, stay independent.
"""
from __future__ import annotations

import math
import sys
import types

import numpy as np

from .memory import CONST, LOCAL, SHARED, TrackedArray, current, poison_value
from .report import NotModelled, located

_NARROW = (np.float32, np.float16)


class Dim3:
    __slots__ = ("x", "y", "z")

    def __init__(self, x, y=1, z=1):
        self.x, self.y, self.z = int(x), int(y), int(z)

    def __iter__(self):
        return iter((self.x, self.y, self.z))

    def __repr__(self):
        return f"({self.x}, {self.y}, {self.z})"


def dim3(value, what) -> Dim3:
    """A launch dimension (int or tuple of up to 3 positive ints) as Dim3."""
    if isinstance(value, Dim3):
        return value
    vals = value if isinstance(value, tuple) else (value,)
    if not 1 <= len(vals) <= 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                      or v < 1 for v in vals):
        raise ValueError(f"{what} must be a positive int or a tuple of 1-3 positive ints; got "
                         f"{value!r}")
    return Dim3(*vals)


def np_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a Numba type (float32), a NumPy dtype/type, or a name."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype))


# -- math: float32 stays float32 --------------------------------------------------------------
def _narrowing(fn):
    def call(*args):
        result = fn(*args)
        if type(result) is float:
            for a in args:
                t = type(a)
                if t in _NARROW:
                    return t(result)
        return result
    call.__name__ = getattr(fn, "__name__", "math_function")
    return call


class FakeMath(types.ModuleType):
    """`math` as compiled kernels see it: a float32 argument gives a float32 result."""

    def __init__(self):
        super().__init__("math")
        for name in dir(math):
            value = getattr(math, name)
            setattr(self, name, _narrowing(value) if callable(value) else value)


FAKE_MATH = FakeMath()


class FakeLibdevice(types.ModuleType):
    """numba.cuda.libdevice's bit casts (what 16-bit storage needs); the rest is not modelled."""

    def __init__(self):
        super().__init__("numba.cuda.libdevice (gpurnn strict simulator)")

    @staticmethod
    def int_as_float(i):
        return np.array(i, np.int32).view(np.float32)[()]

    @staticmethod
    def float_as_int(f):
        return np.array(f, np.float32).view(np.int32)[()]

    @staticmethod
    def uint_as_float(i):
        return np.array(i, np.uint32).view(np.float32)[()]

    @staticmethod
    def float_as_uint(f):
        return np.array(f, np.float32).view(np.uint32)[()]

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotModelled(f"libdevice.{name} is not modelled by gpurnn's strict simulator "
                          f"(modelled: int_as_float, float_as_int, uint_as_float, float_as_uint)")


FAKE_LIBDEVICE = FakeLibdevice()


# -- the cuda module of one launch ------------------------------------------------------------
class _Shared:
    def __init__(self, launch):
        self._launch = launch

    def array(self, shape, dtype, alignment=None):
        thread = current.thread
        return self._launch.shared_array(thread, shape, np_dtype(dtype), sys._getframe(1))


class _Local:
    def __init__(self, launch):
        self._launch = launch

    def array(self, shape, dtype, alignment=None):
        shape = shape if isinstance(shape, tuple) else (shape,)
        data = np.full(shape, poison_value(np_dtype(dtype)), np_dtype(dtype))
        return TrackedArray(data, "local array", LOCAL, self._launch, check_uninit=True)


class _Const:
    def __init__(self, launch):
        self._launch = launch

    def array_like(self, ary):
        data = np.array(ary.data if isinstance(ary, TrackedArray) else ary, copy=True)
        return TrackedArray(data, "const array", CONST, self._launch, readonly=True)


def _atomic_op(name, fn):
    def op(self, ary, idx, *vals):
        frame = sys._getframe(1)
        if not isinstance(ary, TrackedArray):
            raise NotModelled(located(f"cuda.atomic.{name} on {type(ary).__name__}; expected a "
                                      f"kernel array", current.thread, frame.f_code, frame.f_lineno))
        return ary.atomic(idx, lambda old: fn(old, *vals), frame)
    op.__name__ = name
    return op


class _Atomic:
    add = _atomic_op("add", lambda old, v: old + v)
    sub = _atomic_op("sub", lambda old, v: old - v)
    max = _atomic_op("max", lambda old, v: max(old, v))
    min = _atomic_op("min", lambda old, v: min(old, v))
    nanmax = _atomic_op("nanmax", lambda old, v: np.fmax(old, v))
    nanmin = _atomic_op("nanmin", lambda old, v: np.fmin(old, v))
    exch = _atomic_op("exch", lambda old, v: v)
    and_ = _atomic_op("and_", lambda old, v: old & v)
    or_ = _atomic_op("or_", lambda old, v: old | v)
    xor = _atomic_op("xor", lambda old, v: old ^ v)
    inc = _atomic_op("inc", lambda old, v: 0 if old >= v else old + 1)
    dec = _atomic_op("dec", lambda old, v: v if (old == 0 or old > v) else old - 1)
    cas = _atomic_op("cas", lambda old, expected, v: v if old == expected else old)

    def compare_and_swap(self, ary, expected, v):
        return _Atomic.cas(self, ary, 0, expected, v)


class GridGroup:
    def __init__(self, launch):
        self._launch = launch

    def sync(self):
        self._launch.grid_sync(current.thread)


class _CG:
    def __init__(self, launch):
        self._launch = launch

    def this_grid(self):
        return GridGroup(self._launch)


class FakeCuda(types.ModuleType):
    """numba.cuda inside one strict-simulator launch. What it lacks raises NotModelled."""

    MODELLED = ("threadIdx", "blockIdx", "blockDim", "gridDim", "warpsize", "laneid", "grid",
                "gridsize", "syncthreads", "syncthreads_count", "syncthreads_and",
                "syncthreads_or", "shared", "local", "const", "atomic", "cg", "threadfence",
                "threadfence_block", "threadfence_system", "fma", "selp")

    def __init__(self, launch):
        super().__init__("numba.cuda (gpurnn strict simulator)")
        self._launch = launch
        self.blockDim = launch.block_dim
        self.gridDim = launch.grid_dim
        self.warpsize = 32
        self.shared = _Shared(launch)
        self.local = _Local(launch)
        self.const = _Const(launch)
        self.atomic = _Atomic()
        self.cg = _CG(launch)

    def __getattr__(self, name):
        # only reached for names not set above
        if name == "threadIdx":
            return current.thread.thread_idx
        if name == "blockIdx":
            return current.thread.block_idx
        if name == "laneid":
            return current.thread.tid % 32
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotModelled(f"cuda.{name} is not modelled by gpurnn's strict simulator (warp "
                          f"intrinsics, fences beyond no-ops and the rest are left out; modelled: "
                          f"{', '.join(self.MODELLED)})")

    def syncthreads(self):
        self._launch.syncthreads(current.thread)

    def syncthreads_count(self, predicate):
        return self._launch.syncthreads(current.thread, value=bool(predicate), reduce="count")

    def syncthreads_and(self, predicate):
        return self._launch.syncthreads(current.thread, value=bool(predicate), reduce="and")

    def syncthreads_or(self, predicate):
        return self._launch.syncthreads(current.thread, value=bool(predicate), reduce="or")

    def threadfence(self):
        """A no-op: the simulator's memory is sequentially consistent (fences are not modelled)."""

    threadfence_block = threadfence_system = threadfence

    def grid(self, ndim):
        t = current.thread
        b, d = t.block_idx, self.blockDim
        xs = (b.x * d.x + t.thread_idx.x, b.y * d.y + t.thread_idx.y, b.z * d.z + t.thread_idx.z)
        return xs[0] if ndim == 1 else xs[:ndim]

    def gridsize(self, ndim):
        g, d = self.gridDim, self.blockDim
        xs = (g.x * d.x, g.y * d.y, g.z * d.z)
        return xs[0] if ndim == 1 else xs[:ndim]

    @staticmethod
    def fma(a, b, c):
        return a * b + c

    @staticmethod
    def selp(predicate, a, b):
        return a if predicate else b


# -- translation --------------------------------------------------------------------------------
def kernel_source(fn):
    """The Python function behind a kernel or device function: a dispatcher's (or Numba
    simulator kernel's) `py_func`, or the function itself."""
    if isinstance(fn, types.FunctionType):
        return fn
    py = getattr(fn, "py_func", None)
    if isinstance(py, types.FunctionType):
        return py
    raise TypeError(f"kernel must be a Python function or a numba.cuda.jit dispatcher; got "
                    f"{type(fn).__name__}")


def _is_device_function(value) -> bool:
    return (type(value).__name__ in ("CUDADispatcher", "FakeCUDAKernel")
            and isinstance(getattr(value, "py_func", None), types.FunctionType))


def _grid_intrinsics():
    cg = sys.modules.get("numba.cuda.cg")
    if cg is None:
        return None, None
    return getattr(cg, "_this_grid", None), getattr(cg, "_grid_group_sync", None)


class Translator:
    """Rebuilds a kernel and the device functions it reaches for one launch."""

    def __init__(self, launch):
        self.launch = launch
        self.cuda = FakeCuda(launch)
        self._functions = {}
        self._globals = {}
        self.codes = set()        # code objects of translated functions (for error locations)
        this_grid, grid_sync = _grid_intrinsics()
        self._special = {}
        if this_grid is not None:
            self._special[id(this_grid)] = lambda: GridGroup(launch)
        if grid_sync is not None:
            self._special[id(grid_sync)] = lambda grid: grid.sync()

    def value(self, v):
        if isinstance(v, types.ModuleType):
            if v.__name__ == "numba.cuda" or v is sys.modules.get("numba.cuda"):
                return self.cuda
            if v is math:
                return FAKE_MATH
            if v.__name__ == "numba.cuda.libdevice":
                return FAKE_LIBDEVICE
            return v
        special = self._special.get(id(v))
        if special is not None:
            return special
        if _is_device_function(v):
            return self.function(v.py_func)
        if type(v) is types.BuiltinFunctionType and getattr(v, "__module__", None) == "math":
            return getattr(FAKE_MATH, v.__name__)
        return v

    def function(self, fn):
        done = self._functions.get(fn)
        if done is not None:
            return done
        g = self._globals_for(fn.__globals__)
        closure = None
        if fn.__closure__ is not None:
            cells = []
            for cell in fn.__closure__:
                try:
                    cells.append(types.CellType(self.value(cell.cell_contents)))
                except ValueError:          # an empty cell (a name assigned later)
                    cells.append(types.CellType())
            closure = tuple(cells)
        new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, closure)
        new.__kwdefaults__ = fn.__kwdefaults__
        self._functions[fn] = new
        self.codes.add(fn.__code__)
        return new

    def _globals_for(self, module_globals):
        key = id(module_globals)
        g = self._globals.get(key)
        if g is None:
            g = dict(module_globals)
            self._globals[key] = g
            for name, v in list(g.items()):
                g[name] = self.value(v)
        return g
