import zlib

import numpy as np
import pytest

# Relative-error budgets against a reference, per dtype (norm-relative: ||a - b|| / ||b||).
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in float64; NaN anywhere makes it inf (never passes)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return np.inf
    denom = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return num / denom if denom > 0 else num


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@pytest.fixture
def rng(request):
    # a fresh, reproducible stream per test, derived from its id
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def run_in_threads(fn, n):
    """fn(k) for k in range(n), each on its own thread at once; {k: result}. An exception in any
    thread is re-raised here (a failing worker must fail the test, not vanish with its thread)."""
    import threading
    results, errors = {}, []

    def work(k):
        try:
            results[k] = fn(k)
        except Exception as exc:   # handed to the main thread below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results

