import zlib

import numpy as np
import pytest


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

