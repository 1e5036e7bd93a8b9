"""Reruns the in-process GPU tests (torch modules on CUDA tensors, CuPy interop) in a fresh
process on a machine with a GPU.

Why: tests/test_sim_*.py put numba.cuda in simulator mode for this whole pytest process (the
mode is fixed at numba.cuda's first import), so here those GPU tests can only skip. In a
subprocess without NUMBA_ENABLE_CUDASIM they run for real; this test fails if any of them fails
or skips there.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from test_gpu_kernels import _hardware_env, _no_gpu_reason

pytestmark = pytest.mark.gpu
HERE = Path(__file__).parent
FILES = ["test_torch_module.py", "test_interop.py"]


def test_in_process_gpu_tests_in_a_fresh_process():
    reason = _no_gpu_reason()
    if reason is not None:
        pytest.skip(reason)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "-rs", *[str(HERE / f) for f in FILES]],
                       env=_hardware_env(), cwd=HERE.parent, capture_output=True, text=True, timeout=1200)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail
