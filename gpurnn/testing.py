"""How gpurnn compares a result with a reference, written once for the tests, `gpurnn check` and
the benchmarks: one relative error and one table of tolerances per dtype.

rel_err(actual, expected) is the norm-relative error of the whole array,

    ||actual - expected||_2 / ||expected||_2        computed in float64,

so `expected` should be the most exact reference at hand (float64 NumPy backend, or, for a
16-bit run, float32 on the same rounded inputs; each table row says which).
Zero handling: where the reference is all zeros (or empty) the error is the absolute
||actual - expected||_2: an exact zero matches (0.0) and anything else is measured on the
absolute scale, never divided by zero. NaN or inf anywhere, in either array, gives inf, so it
never passes a tolerance. The shapes must be equal (no broadcasting): AssertionError otherwise.
Torch tensors (detached, any device, bfloat16 too) and anything np.asarray takes are accepted.

TOL (outputs, final states, the reserve) and GRAD_TOL (gradients), by dtype; a key may be a name
("float32"), a NumPy dtype or scalar type, ml_dtypes.bfloat16 or a torch dtype:

    dtype     TOL          GRAD_TOL     reference
    float64   1e-10        1e-10        float64, same inputs
    float32   1e-5         1e-5         float64 (or the NumPy backend in float32), same inputs
    float16   8 u = 3.9e-3 16 u = 7.8e-3 float32 on the same rounded inputs, u = 2^-11
    bfloat16  8 u = 3.1e-2 16 u = 6.2e-2 float32 on the same rounded inputs, u = 2^-8

16-bit storage rounds every stored value to u (unit roundoff) and a gradient passes through
twice as many rounded values as an output, hence 8 and 16 units. FD_TOL is the budget of a
float64 central finite difference against the analytic gradient (step 1e-6).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# unit roundoff of each dtype's significand (half an ulp at 1)
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11,
                 "bfloat16": 2.0 ** -8}
FD_TOL = 1e-7


def dtype_name(dtype) -> str:
    """'float32' for "float32", np.float32, np.dtype('float32') or torch.float32; 'bfloat16'
    for ml_dtypes.bfloat16 and torch.bfloat16."""
    if isinstance(dtype, str):
        return dtype
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch."):]
    return np.dtype(dtype).name


class PerDtype(Mapping):
    """A read-only table keyed by dtype name that takes any spelling of a dtype (dtype_name)."""

    def __init__(self, table):
        self._table = dict(table)

    def __getitem__(self, dtype):
        name = dtype_name(dtype)
        try:
            return self._table[name]
        except KeyError:
            raise KeyError(f"no entry for dtype {name!r}; known: {tuple(self._table)}") from None

    def __iter__(self):
        return iter(self._table)

    def __len__(self):
        return len(self._table)

    def __repr__(self):
        return f"PerDtype({self._table!r})"


TOL = PerDtype({"float64": 1e-10, "float32": 1e-5, "float16": 8 * UNIT_ROUNDOFF["float16"],
                "bfloat16": 8 * UNIT_ROUNDOFF["bfloat16"]})
GRAD_TOL = PerDtype({"float64": 1e-10, "float32": 1e-5, "float16": 16 * UNIT_ROUNDOFF["float16"],
                     "bfloat16": 16 * UNIT_ROUNDOFF["bfloat16"]})


def _float64(a):
    if hasattr(a, "detach") and hasattr(a, "double"):        # a torch tensor
        a = a.detach().to(device="cpu").double().numpy()
    return np.asarray(a, dtype=np.float64)


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64; absolute where ||expected|| = 0; inf for
    any NaN or inf (see the module docstring)."""
    a, b = _float64(actual), _float64(expected)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape} (expected)")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    diff, scale = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, tol, what=""):
    """AssertionError naming `what` unless rel_err(actual, expected) <= tol."""
    err = rel_err(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}")
