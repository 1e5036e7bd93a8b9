"""What the CPU fast path borrows from the process: a BLAS, an OpenMP runtime, and a way for
Numba code to call C functions found at run time.

Numba code reaches a C function through its address, passed as an ordinary integer argument
(never baked into the compiled code, so `cache=True` stays valid from one process to the next):
`call_void` / `call_i32` call it with arguments by value (C, CBLAS), `call_byref` passes every
scalar argument by reference and every `voidptr` argument as it is (Fortran BLAS).

BLAS, in order of preference (`find_blas`):
  mkl       Intel MKL inside torch's libtorch_cpu, when torch is already imported: its GEMMs
            run on torch's own OpenMP threads, and its packed-GEMM API (cblas_sgemm_pack /
            _compute) keeps W_hh packed across steps. Fortran sgemm_/dgemm_ (LP64).
  openblas  the OpenBLAS NumPy's wheels ship (CBLAS, 64-bit integers).
  numba     plain loops compiled by Numba: always there, correct, slow.
OpenMP (`find_openmp`): the libgomp already loaded (torch's, when torch is imported: a bare
soname resolves to the loaded copy, so torch and gpurnn share one team of threads), else the
system's. Without one the fast path runs on the calling thread alone.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# ---- calling C from Numba ---------------------------------------------------------------------


def _caller(ret):
    @intrinsic
    def call(typingctx, fnptr, args):
        if not isinstance(fnptr, types.Integer) or not isinstance(args, types.BaseTuple):
            return None
        sig = ret(fnptr, args)

        def codegen(context, builder, signature, llargs):
            address, packed = llargs
            argtys = signature.args[1].types
            rty = ir.VoidType() if ret is types.void else context.get_value_type(ret)
            fnty = ir.FunctionType(rty, [context.get_value_type(t) for t in argtys])
            fn = builder.inttoptr(address, fnty.as_pointer())
            result = builder.call(fn, [builder.extract_value(packed, i) for i in range(len(argtys))])
            return context.get_dummy_value() if ret is types.void else result
        return sig, codegen
    return call


call_void = _caller(types.void)
call_i32 = _caller(types.int32)


@intrinsic
def call_byref(typingctx, fnptr, args):
    """Fortran convention: scalars by reference (stack slots), voidptr arguments as they are."""
    if not isinstance(fnptr, types.Integer) or not isinstance(args, types.BaseTuple):
        return None
    sig = types.void(fnptr, args)

    def codegen(context, builder, signature, llargs):
        address, packed = llargs
        argtys = signature.args[1].types
        values, lltys = [], []
        for i, t in enumerate(argtys):
            v = builder.extract_value(packed, i)
            if t == types.voidptr:
                values.append(v)
            else:
                slot = cgutils.alloca_once(builder, context.get_value_type(t))
                builder.store(v, slot)
                values.append(slot)
            lltys.append(values[-1].type)
        fn = builder.inttoptr(address, ir.FunctionType(ir.VoidType(), lltys).as_pointer())
        builder.call(fn, values)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def voidptr(typingctx, address):
    """An integer address as a void pointer (for numba.carray and by-value pointer arguments)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
    return sig, codegen


# ---- BLAS ---------------------------------------------------------------------------------------

# gemm kinds understood by gpurnn.cpu.kernels
GEMM_NUMBA, GEMM_FORTRAN, GEMM_CBLAS64 = 0, 1, 2
BLAS_NAMES = ("mkl", "openblas", "numba")


@dataclass(frozen=True)
class Blas:
    name: str              # 'mkl' | 'openblas' | 'numba'
    kind: int              # GEMM_* calling convention of sgemm/dgemm
    sgemm: int = 0         # addresses (0: absent)
    dgemm: int = 0
    pack_size: int = 0     # MKL packed GEMM (float32): cblas_sgemm_pack_get_size / _pack / _compute
    pack: int = 0
    compute: int = 0
    set_threads_local: int = 0   # MKL: int f(int), this thread's thread count; returns the old one
    sgemv: int = 0
    dgemv: int = 0
    lib: object = None
    threads: tuple = ()    # OpenBLAS: (get, set) of its process-wide thread count
    where: str = ""

    @property
    def packed(self):
        return bool(self.compute)


def _address(lib, name):
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


def _mkl():
    torch = sys.modules.get("torch")
    if torch is None or not getattr(torch, "__file__", None):
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path):
        return None
    lib = ctypes.CDLL(path)
    names = ("sgemm_", "dgemm_", "cblas_sgemm_pack_get_size", "cblas_sgemm_pack",
             "cblas_sgemm_compute", "MKL_Set_Num_Threads_Local")
    found = [_address(lib, n) for n in names]
    if not all(found):
        return None
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack_get_size.argtypes = [ctypes.c_int] * 4
    lib.cblas_sgemm_pack.restype = None
    lib.cblas_sgemm_pack.argtypes = ([ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                            ctypes.c_void_p])
    return Blas("mkl", GEMM_FORTRAN, *found, sgemv=_address(lib, "sgemv_"),
                dgemv=_address(lib, "dgemv_"), lib=lib, where=path)


def _openblas():
    import numpy
    base = os.path.dirname(numpy.__file__)
    candidates = sorted(glob.glob(os.path.join(base, os.pardir, "numpy.libs", "*openblas*")) +
                        glob.glob(os.path.join(base, ".dylibs", "*openblas*")))
    for path in candidates:
        try:
            lib = ctypes.CDLL(os.path.abspath(path))
        except OSError:
            continue
        for prefix, suffix in (("scipy_cblas_", "64_"), ("cblas_", "64_")):
            s, d = _address(lib, f"{prefix}sgemm{suffix}"), _address(lib, f"{prefix}dgemm{suffix}")
            if s and d:
                for p in ("scipy_openblas_", "openblas_"):
                    get, put = f"{p}get_num_threads64_", f"{p}set_num_threads64_"
                    if _address(lib, get) and _address(lib, put):
                        getattr(lib, get).restype = ctypes.c_int
                        getattr(lib, put).argtypes = [ctypes.c_int]
                        getattr(lib, put).restype = None
                        return Blas("openblas", GEMM_CBLAS64, s, d, lib=lib,
                                    sgemv=_address(lib, f"{prefix}sgemv{suffix}"),
                                    dgemv=_address(lib, f"{prefix}dgemv{suffix}"),
                                    threads=(getattr(lib, get), getattr(lib, put)),
                                    where=os.path.abspath(path))
    return None


_cache = {}


def find_blas(name="auto"):
    """The BLAS to use: a name from BLAS_NAMES, or 'auto' (MKL when torch is imported, else
    NumPy's OpenBLAS, else Numba loops). A named BLAS that is not here is a ValueError."""
    if name == "auto":
        for candidate in ("mkl", "openblas"):
            blas = find_blas(candidate) if _available(candidate) else None
            if blas is not None:
                return blas
        return find_blas("numba")
    if name not in BLAS_NAMES:
        raise ValueError(f"backend_options['blas'] must be one of {('auto',) + BLAS_NAMES}; got {name!r}")
    if name == "numba":
        return Blas("numba", GEMM_NUMBA, where="loops compiled by Numba")
    if name not in _cache or (name == "mkl" and _cache[name] is None):
        _cache[name] = _mkl() if name == "mkl" else _openblas()
    if _cache[name] is None:
        why = ("torch (with MKL) is not imported" if name == "mkl"
               else "NumPy's bundled OpenBLAS was not found")
        raise ValueError(f"backend_options['blas'] = {name!r} is not available here: {why}")
    return _cache[name]


def _available(name):
    if name == "mkl" and "torch" not in sys.modules:
        return False
    try:
        find_blas(name)
    except ValueError:
        return False
    return True


# ---- OpenMP -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenMP:
    parallel: int          # GOMP_parallel(fn, data, num_threads, flags)
    barrier: int           # GOMP_barrier()
    thread_num: int        # omp_get_thread_num()
    num_threads: int       # omp_get_num_threads()
    lib: object
    where: str

    def max_threads(self):
        """The calling thread's OpenMP thread count (OMP_NUM_THREADS, torch.set_num_threads,
        threadpoolctl's limits all set it)."""
        return int(self.lib.omp_get_max_threads())

    def in_parallel(self):
        return bool(self.lib.omp_in_parallel())


_openmp = []


def find_openmp():
    """The process's libgomp (torch's when torch is loaded), or None."""
    if not _openmp:
        found = None
        for name in ("libgomp.so.1", "libgomp.dylib", "libomp.dylib"):
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            addrs = [_address(lib, n) for n in ("GOMP_parallel", "GOMP_barrier", "omp_get_thread_num",
                                                "omp_get_num_threads", "omp_get_max_threads")]
            if all(addrs):
                lib.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                lib.GOMP_parallel.restype = None
                found = OpenMP(*addrs[:4], lib=lib, where=name)
                break
        _openmp.append(found)
    return _openmp[0]
